#!/usr/bin/env python3
"""Checks the timeline files test_trace wrote (DIR/trace.rank<r>.json) with
Python's json module against what the program did (DIR/info.rank<r>.json),
and the SVG that tools/ddptrace drew from them (DIR/timeline.svg) with
xml.etree.

    trace_check.py DIR WORLD

Exit 0 when every check holds; prints one line per failure otherwise."""
import json
import sys
import xml.etree.ElementTree as ET

d, world = sys.argv[1], int(sys.argv[2])
fails = []


def check(cond, what):
    if not cond:
        fails.append(what)


for rank in range(world):
    info = json.load(open(f"{d}/info.rank{rank}.json"))
    events = json.load(open(f"{d}/trace.rank{rank}.json"))  # must be valid JSON
    check(isinstance(events, list), f"rank {rank}: the file is a JSON array")
    meta = [e for e in events if e.get("ph") == "M"]
    timed = [e for e in events if e.get("ph") in ("X", "i")]
    check(len(meta) + len(timed) == len(events), f"rank {rank}: every event is X, i or M")
    for e in events:
        check(isinstance(e.get("name"), str) and e.get("pid") == rank and e.get("tid") in (0, 1),
              f"rank {rank}: event fields (name, pid = rank, tid 0/1): {e}")
    for e in timed:
        check(isinstance(e.get("ts"), (int, float)) and isinstance(e.get("cat"), str) and isinstance(e.get("args"), dict),
              f"rank {rank}: ts, cat, args: {e}")
        if e["ph"] == "X":
            check(isinstance(e.get("dur"), (int, float)) and e["dur"] >= 0, f"rank {rank}: dur >= 0: {e}")
    names = {e["args"].get("name") for e in meta if e["name"] in ("process_name", "thread_name")}
    check(f"rank {rank}" in names and "communication" in names, f"rank {rank}: process and thread names {names}")
    tinfo = [e for e in meta if e["name"] == "trace_info"]
    check(len(tinfo) == 1 and tinfo[0]["args"]["dropped_events"] == 0, f"rank {rank}: nothing dropped: {tinfo}")

    def named(prefix, ph="X"):
        return [e for e in timed if e["ph"] == ph and e["name"].startswith(prefix)]

    steps = named("step ")
    synced = [e for e in steps if e["args"]["synced"] == 1]
    check(len(synced) == info["synced_steps"], f"rank {rank}: {len(synced)} synced step events, want {info['synced_steps']}")
    check(len(steps) == info["micro_steps"], f"rank {rank}: {len(steps)} step events, want {info['micro_steps']}")
    marks = named("mark ", "i")
    check(len(marks) == info["params"] * info["micro_steps"], f"rank {rank}: {len(marks)} marks")
    check(all(0 <= m["args"]["param"] < info["params"] and 0 <= m["args"]["bucket"] < info["buckets"] for m in marks),
          f"rank {rank}: mark args")
    launches = named("launch bucket ", "i")
    reduces = named("reduce bucket ")
    check(len(launches) == len(reduces) == info["buckets"] * info["synced_steps"],
          f"rank {rank}: {len(launches)} launches, {len(reduces)} reductions, want {info['buckets']} x {info['synced_steps']}")
    check(sum(e["args"]["bytes"] for e in reduces) == info["bytes"] == info["bucket_bytes"] * info["synced_steps"],
          f"rank {rank}: bytes in the reductions {sum(e['args']['bytes'] for e in reduces)} vs statistics {info['bytes']}")
    # the statistics are the reductions' durations
    comm = sum(e["dur"] for e in reduces) * 1e-6
    check(abs(comm - info["comm_s"]) <= 1e-6 * len(reduces) + 1e-9, f"rank {rank}: reductions {comm} s vs comm_s {info['comm_s']}")
    if world > 1:
        check(any(e["tid"] == 1 for e in reduces), f"rank {rank}: buckets reduced on the communication thread")
    # every reduction lies inside a synced step, after its bucket was launched
    for e in reduces:
        inside = [s for s in synced if s["ts"] - 1 <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1]
        check(len(inside) == 1, f"rank {rank}: {e['name']} at {e['ts']} inside one synced step")
        launched = [l for l in launches if l["args"]["bucket"] == e["args"]["bucket"] and l["ts"] <= e["ts"] + 1]
        check(len(launched) >= 1, f"rank {rank}: {e['name']} launched before it ran")
    # buckets launch in order within a step
    for s in synced:
        order = [l["args"]["bucket"] for l in sorted(launches, key=lambda l: l["ts"]) if s["ts"] <= l["ts"] <= s["ts"] + s["dur"]]
        check(order == list(range(info["buckets"])), f"rank {rank}: launch order in step {s['args']['step']}: {order}")
    check(len(named("optimizer")) == info["synced_steps"], f"rank {rank}: optimizer events")
    check(len(named("wait for buckets")) >= 1 or world == 1, f"rank {rank}: waits")
    check(len(named("checkpoint save")) == 1 and named("checkpoint save")[0]["args"]["bytes"] > 0, f"rank {rank}: checkpoint event")
    check(len(named("ddp_allreduce")) == 1 and named("ddp_allreduce")[0]["args"]["bytes"] == 4, f"rank {rank}: collective event")

    # the bounded ring: at most 20 timed events, the rest counted as dropped
    small = json.load(open(f"{d}/small_{rank}.json"))
    stimed = [e for e in small if e.get("ph") in ("X", "i")]
    sinfo = [e for e in small if e.get("name") == "trace_info"]
    check(len(stimed) == 20 and sinfo and sinfo[0]["args"]["dropped_events"] > 0 and sinfo[0]["args"]["ring_events"] == 20,
          f"rank {rank}: ring of 20: {len(stimed)} events kept, info {sinfo}")

# the picture: one lane per rank and thread, boxes in it
svg = ET.parse(f"{d}/timeline.svg").getroot()
ns = "{http://www.w3.org/2000/svg}"
lanes = [g for g in svg.iter(ns + "g") if g.get("class") == "lane"]
labels = sorted(t.text for g in lanes for t in g.iter(ns + "text"))
boxes = [r for r in svg.iter(ns + "rect") if r.get("class") == "ev"]
check(len(lanes) == 2 * world, f"svg: {len(lanes)} lanes for {world} ranks: {labels}")
check(all(f"rank {r} communication" in labels for r in range(world)), f"svg: lane labels {labels}")
check(len(boxes) > 0 and all(float(r.get("width")) > 0 for r in boxes), f"svg: {len(boxes)} boxes")
check(any("reduce bucket" in (r.find(ns + "title").text or "") for r in boxes), "svg: reductions drawn")

for f in fails:
    print("FAIL", f)
print(f"trace_check: world {world}, {len(fails)} failures")
sys.exit(1 if fails else 0)
