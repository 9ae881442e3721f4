"""safetensors_interop.py - an independent reader and writer of the safetensors format
(https://huggingface.co/docs/safetensors: u64 little-endian N, N bytes of UTF-8 JSON,
the tensors' bytes), to check ddp.h's files against it. Python's json and struct only;
torch (torch.frombuffer) is used as a second reader when it can be imported.

  safetensors_interop.py check FILE      FILE was written by `test_safetensors write`:
                                         check every rule of the format and every value
  safetensors_interop.py write FILE      write the same model with the values negated,
                                         keys in another order, escaped names, for
                                         `test_safetensors read` to load
  safetensors_interop.py export FILE [DATA_DIR ACCURACY]
                                         FILE from `fashion_mlp --export`: names, shapes,
                                         dtypes; with torch and the data set, the test
                                         accuracy of the weights in PyTorch, which must
                                         match ACCURACY (what fashion_mlp printed)

The model and value() are those of tests/test_safetensors.c.
"""
import gzip
import json
import math
import os
import struct
import sys

try:
    import torch
except Exception:  # absent or broken: the struct reader alone
    torch = None

MODEL = [  # name, dtype, shape
    ("embed.weight", "F32", [7, 5]),
    ("proj.weight", "F64", [4, 3]),
    ("proj.bias", "F64", [4]),
    ("norm.w16", "F16", [2, 3, 2]),
    ("head.bf16", "BF16", [9]),
    ("caf\u00e9.scale", "F32", [1]),
]
SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
TORCH_DTYPE = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def fail(msg):
    print("safetensors_interop: FAIL: " + msg)
    sys.exit(1)


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def value(p, i):
    v = (((i * 37 + p * 11) % 41) - 20) * 0.125
    if MODEL[p][1] in ("F32", "F64"):
        v += (i + 1) / 3.0
    return v


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def bf16_bits(x):  # round to nearest even from f32, as ddp.h does
    u = struct.unpack("<I", struct.pack("<f", x))[0]
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16) & 0xFFFF


def encode(dtype, values):
    if dtype == "F64":
        return struct.pack("<%dd" % len(values), *values)
    if dtype == "F32":
        return struct.pack("<%df" % len(values), *values)
    if dtype == "F16":
        return struct.pack("<%de" % len(values), *values)
    return struct.pack("<%dH" % len(values), *[bf16_bits(v) for v in values])


def decode(dtype, raw):
    n = len(raw) // SIZE[dtype]
    if dtype == "F64":
        return list(struct.unpack("<%dd" % n, raw))
    if dtype == "F32":
        return list(struct.unpack("<%df" % n, raw))
    if dtype == "F16":
        return list(struct.unpack("<%de" % n, raw))
    return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack("<%dH" % n, raw)]


def expected(p, sign):
    name, dtype, shape = MODEL[p]
    vals = [sign * value(p, i) for i in range(numel(shape))]
    return decode(dtype, encode(dtype, vals))  # as stored in dtype


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        fail("duplicate keys in a JSON object: %s" % keys)
    return dict(pairs)


def read_file(path):
    """Parse and check the format's rules; return (metadata, {name: (dtype, shape, raw)}, order)."""
    blob = open(path, "rb").read()
    if len(blob) < 8:
        fail("%s: shorter than 8 bytes" % path)
    (n,) = struct.unpack("<Q", blob[:8])
    if n > 100000000 or 8 + n > len(blob):
        fail("%s: header length %d" % (path, n))
    header = blob[8:8 + n]
    if header[:1] != b"{":
        fail("the header does not begin with '{'")
    text = header.decode("utf-8")  # raises on invalid UTF-8
    stripped = text.rstrip(" ")
    if not stripped.endswith("}"):
        fail("the header's padding is not spaces after the closing brace")
    head = json.loads(stripped, object_pairs_hook=no_duplicates)
    meta = head.pop("__metadata__", None)
    if meta is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        fail("__metadata__ is not a map of strings")
    data = blob[8 + n:]
    tensors, spans = {}, []
    for name, info in head.items():
        if sorted(info) != ["data_offsets", "dtype", "shape"]:
            fail("tensor %s has keys %s" % (name, sorted(info)))
        b, e = info["data_offsets"]
        if info["dtype"] not in SIZE:
            fail("tensor %s has dtype %s" % (name, info["dtype"]))
        if e - b != numel(info["shape"]) * SIZE[info["dtype"]]:
            fail("tensor %s: data_offsets %s do not match %s %s" % (name, info["data_offsets"], info["dtype"], info["shape"]))
        spans.append((b, e, name))
        tensors[name] = (info["dtype"], info["shape"], data[b:e])
    at = 0
    for b, e, name in sorted(spans):
        if b != at:
            fail("tensor %s begins at %d, the previous one ends at %d (hole or overlap)" % (name, b, at))
        at = e
    if at != len(data):
        fail("the tensors cover %d bytes of a %d-byte buffer" % (at, len(data)))
    order = [name for _, _, name in sorted(spans)]
    return n, meta, tensors, order


def torch_values(dtype, shape, raw):
    t = torch.frombuffer(bytearray(raw), dtype=getattr(torch, TORCH_DTYPE[dtype])) if raw else \
        torch.zeros(0, dtype=getattr(torch, TORCH_DTYPE[dtype]))
    t = t.reshape(shape)
    return [float(x) for x in t.to(torch.float64).flatten().tolist()]


def check(path):
    n, meta, tensors, order = read_file(path)
    if n % 8:
        fail("the header length %d is not a multiple of 8" % n)
    if meta != {"format": "pt", "producer": "ddp.h tests/test_safetensors.c"}:
        fail("__metadata__ is %r" % meta)
    if sorted(tensors) != sorted(m[0] for m in MODEL):
        fail("tensors %s, expected %s" % (sorted(tensors), sorted(m[0] for m in MODEL)))
    widths = [SIZE[tensors[name][0]] for name in order]
    if widths != sorted(widths, reverse=True):
        fail("the tensors are not laid out widest type first: %s" % order)
    count = 0
    for p, (name, dtype, shape) in enumerate(MODEL):
        fdtype, fshape, raw = tensors[name]
        if (fdtype, fshape) != (dtype, shape):
            fail("tensor %s is %s %s, expected %s %s" % (name, fdtype, fshape, dtype, shape))
        got, want = decode(dtype, raw), expected(p, 1.0)
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                fail("%s[%d] is %r, expected %r" % (name, i, g, w))
        if torch is not None and torch_values(dtype, shape, raw) != got:
            fail("torch.frombuffer reads other values for %s" % name)
        count += len(got)
    print("check: %s: %d tensors, %d values equal to the writer's, header %d bytes (torch.frombuffer: %s)"
          % (path, len(tensors), count, n, "agrees" if torch is not None else "not installed"))


def write(path):
    # reverse name order, one data order, names escaped by json.dumps (ensure_ascii)
    meta = {"format": "pt", "writer": "tests/safetensors_interop.py", "note": "\u00e9t\u00e9"}
    header, blobs, off = {"__metadata__": meta}, [], 0
    for p in sorted(range(len(MODEL)), key=lambda q: MODEL[q][0], reverse=True):
        name, dtype, shape = MODEL[p]
        raw = encode(dtype, [-value(p, i) for i in range(numel(shape))])
        if torch is not None and dtype in ("F32", "F64", "F16"):
            t = torch.tensor([-value(p, i) for i in range(numel(shape))], dtype=getattr(torch, TORCH_DTYPE[dtype]))
            if bytes(t.numpy().tobytes()) != raw:
                fail("torch encodes %s differently from struct" % name)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    text = json.dumps(header).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    print("write: %s: %d tensors, values negated" % (path, len(MODEL)))


def idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", raw[8:16])
        return count, rows * cols, raw[16:]
    return count, 1, raw[8:]


def export(path, data_dir=None, accuracy=None):
    shapes = {"fc1.weight": [256, 784], "fc1.bias": [256], "fc2.weight": [256, 256], "fc2.bias": [256],
              "fc3.weight": [10, 256], "fc3.bias": [10]}
    n, meta, tensors, order = read_file(path)
    if {k: v[1] for k, v in tensors.items()} != shapes or any(v[0] != "F32" for v in tensors.values()):
        fail("the export holds %s" % {k: (v[0], v[1]) for k, v in tensors.items()})
    for name, (dtype, shape, raw) in tensors.items():
        if not all(math.isfinite(x) for x in decode(dtype, raw)):
            fail("%s has a value that is not finite" % name)
    print("export: %s: the MLP's 6 tensors, F32, with their shapes; metadata %s" % (path, meta))
    if torch is None or not data_dir:
        print("export: torch or the data set missing: the PyTorch evaluation is skipped")
        return
    images = [os.path.join(data_dir, f) for f in ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")]
    labels = [os.path.join(data_dir, f) for f in ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte")]
    images = [f for f in images if os.path.exists(f)]
    labels = [f for f in labels if os.path.exists(f)]
    if not images or not labels:
        print("export: no Fashion-MNIST test files in %s: the PyTorch evaluation is skipped" % data_dir)
        return
    count, dim, pix = idx(images[0])
    _, _, lab = idx(labels[0])
    x = torch.frombuffer(bytearray(pix), dtype=torch.uint8).reshape(count, dim).to(torch.float32) / 255.0
    x = (x - 0.2860) / 0.3530  # mlp.h's MLP_FASHION_MEAN / _STD
    y = torch.frombuffer(bytearray(lab), dtype=torch.uint8).to(torch.int64)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))
    state = {}
    for i, layer in ((1, "0"), (2, "2"), (3, "4")):
        for part in ("weight", "bias"):
            dtype, shape, raw = tensors["fc%d.%s" % (i, part)]
            state["%s.%s" % (layer, part)] = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)
    model.load_state_dict(state)
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).double().mean().item()
    print("export: PyTorch test accuracy of the exported weights: %.4f (fashion_mlp printed %s)" % (acc, accuracy))
    if accuracy is not None and abs(acc - float(accuracy)) > 0.002:
        fail("PyTorch's accuracy %.4f differs from fashion_mlp's %s" % (acc, accuracy))


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("check", "write", "export"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "check":
        check(sys.argv[2])
    elif sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        export(sys.argv[2], *(sys.argv[3:5]))


if __name__ == "__main__":
    main()
