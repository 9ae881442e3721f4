#!/usr/bin/env bash
# run.sh - build tests/consumer as another project would, and run it (2 ranks).
#
#   run.sh STEP SOURCE_DIR BUILD_DIR WORK_DIR [cmake args for the consumer...]
#
# STEP: install       cmake --install BUILD_DIR into a staging prefix, moved to
#                     WORK_DIR/prefix (so the package must be relocatable); checks
#                     the layout and that no installed text file names a path of
#                     this checkout or of the staging prefix
#       package       find_package(ddp 0.2 CONFIG REQUIRED) from WORK_DIR/prefix
#       versions      which version requests the installed package accepts
#       subdirectory  add_subdirectory(SOURCE_DIR)
#       fetchcontent  FetchContent: the checkout as a git repository at its HEAD
#                     commit (or the directory itself when it is no git checkout)
#       pkgconfig     the Makefile: cc $(pkg-config --cflags --libs ddp)
# Environment: CMAKE (default cmake), CC (the C compiler), DDP_VERSION_EXPECTED.
# Exit 77 (skip) when a tool the step needs is missing.
set -euo pipefail
step=$1 src=$2 build=$3 work=$4
shift 4
cmake=${CMAKE:-cmake}
here=$src/tests/consumer
prefix=$work/prefix
mkdir -p "$work"

configure_build_run() {   # dir, cmake args...
  local dir=$1; shift
  rm -rf "$dir"
  "$cmake" -S "$here" -B "$dir" ${CC:+-DCMAKE_C_COMPILER=$CC} "$@" > "$dir.log" 2>&1 ||
    { cat "$dir.log"; echo "run.sh: configuring the consumer ($step) failed"; exit 1; }
  grep -E "^-- consumer:|^-- ddp.h" "$dir.log" || true
  "$cmake" --build "$dir" -j2 >> "$dir.log" 2>&1 ||
    { cat "$dir.log"; echo "run.sh: building the consumer ($step) failed"; exit 1; }
  for exe in consumer consumer_cuda; do
    [ -x "$dir/$exe" ] || continue
    timeout 120 "$dir/$exe"
  done
}

case $step in
install)
  stage=$work/stage
  rm -rf "$stage" "$prefix"
  "$cmake" --install "$build" --prefix "$stage"
  mv "$stage" "$prefix"
  for f in include/ddp.h include/dp.h include/ddp_kernels.cuh share/cmake/ddp/ddpConfig.cmake \
           share/cmake/ddp/ddpConfigVersion.cmake share/cmake/ddp/ddpTargets.cmake share/pkgconfig/ddp.pc; do
    [ -f "$prefix/$f" ] || { echo "run.sh: the install has no $f"; exit 1; }
  done
  for h in ddp.h dp.h ddp_kernels.cuh; do
    cmp -s "$src/$h" "$prefix/include/$h" || { echo "run.sh: installed $h differs from the checkout's"; exit 1; }
  done
  if grep -rlF -e "$src" -e "$stage" -e "$(cd "$build" && pwd)" "$prefix/share"; then
    echo "run.sh: the installed package files above name a path of the build machine"; exit 1
  fi
  echo "install: headers in <prefix>/include, package in share/cmake/ddp, ddp.pc; relocatable"
  ;;
package)
  [ -d "$prefix" ] || { echo "run.sh: no $prefix (the install step runs first)"; exit 1; }
  configure_build_run "$work/package" -DDDP_CONSUMER_MODE=package -DCMAKE_PREFIX_PATH="$prefix" "$@"
  ;;
versions)
  [ -d "$prefix" ] || { echo "run.sh: no $prefix (the install step runs first)"; exit 1; }
  rm -rf "$work/versions"
  "$cmake" -S "$here/versions" -B "$work/versions" ${CC:+-DCMAKE_C_COMPILER=$CC} -DCMAKE_PREFIX_PATH="$prefix" \
      -DDDP_EXPECTED_VERSION="${DDP_VERSION_EXPECTED:?}" > "$work/versions.log" 2>&1 ||
    { cat "$work/versions.log"; echo "run.sh: the version requests were not answered as they must be"; exit 1; }
  grep "find_package" "$work/versions.log"
  ;;
subdirectory)
  configure_build_run "$work/subdirectory" -DDDP_CONSUMER_MODE=subdirectory -DDDP_CHECKOUT="$src" "$@"
  ;;
fetchcontent)
  tag=""
  if command -v git > /dev/null && tag=$(git -C "$src" rev-parse --verify HEAD 2> /dev/null); then
    if [ -n "$(git -C "$src" status --porcelain --untracked-files=no 2> /dev/null)" ]; then
      echo "note: FetchContent builds the committed HEAD $tag; uncommitted changes are not in it"
    fi
    echo "fetchcontent: GIT_REPOSITORY file://$src GIT_TAG $tag"
    configure_build_run "$work/fetchcontent" -DDDP_CONSUMER_MODE=fetchcontent \
        -DDDP_GIT_REPOSITORY="file://$src" -DDDP_GIT_TAG="$tag" "$@"
  else
    echo "fetchcontent: SOURCE_DIR $src (no git checkout)"
    configure_build_run "$work/fetchcontent" -DDDP_CONSUMER_MODE=fetchcontent -DDDP_CHECKOUT="$src" "$@"
  fi
  ;;
pkgconfig)
  [ -d "$prefix" ] || { echo "run.sh: no $prefix (the install step runs first)"; exit 1; }
  command -v make > /dev/null || { echo "SKIP: no make"; exit 77; }
  pc=${PKG_CONFIG:-pkg-config}
  command -v "$pc" > /dev/null || { echo "SKIP: no pkg-config (apt-get install pkg-config)"; exit 77; }
  rm -rf "$work/pkgconfig"
  mkdir -p "$work/pkgconfig"
  echo "pkg-config --cflags --libs ddp: $(PKG_CONFIG_PATH=$prefix/share/pkgconfig "$pc" --cflags --libs ddp)"
  PKG_CONFIG_PATH=$prefix/share/pkgconfig make -s -C "$work/pkgconfig" -f "$here/Makefile" SRCDIR="$here" \
      ${CC:+CC=$CC} PKG_CONFIG="$pc"
  timeout 120 "$work/pkgconfig/consumer_pc"
  ;;
*)
  echo "run.sh: unknown step '$step'"; exit 2 ;;
esac
