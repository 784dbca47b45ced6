#!/bin/sh
# example_build.sh: builds the out-of-tree example plugin the way a user
# would and checks that moelm-train finds it.
#
#   example_build.sh <cmake> <main build dir> <example source dir> <work dir> <moelm-train> <kind> <name>
#                    [<C compiler>]
#
# 1. installs the main build into <work dir>/stage (DESTDIR, prefix /moelm,
#    so an absolute install directory also lands under the stage and nothing
#    outside <work dir> is written);
# 2. configures and builds the example with only -DCMAKE_PREFIX_PATH pointing
#    at that prefix (no access to the source tree's headers);
# 3. runs moelm-train --user-dir <example build dir> --list-plugins and looks
#    for the example's line (libmoe-<kind>-<name>.so);
# 4. for a gate, trains a tiny MoE model on the CPU with it for a few updates.
# The example's build directory is left in <work dir>/build for the test that
# loads it with the registry. Exit status 0 on success, 1 with a message.
set -u

if [ $# -lt 7 ]; then
    echo "usage: $0 <cmake> <main build dir> <example source dir> <work dir> <moelm-train> <kind> <name>" \
        "[<C compiler>]" >&2
    exit 1
fi
CMAKE=$1
MAIN_BUILD=$2
EXAMPLE_SRC=$3
WORK=$4
TRAIN=$5
KIND=$6
NAME=$7
CC_ARG=
if [ $# -ge 8 ] && [ -n "$8" ]; then
    CC_ARG="-DCMAKE_C_COMPILER=$8"
fi
SO=libmoe-$KIND-$NAME.so

fail() {
    echo "example_build: $*" >&2
    exit 1
}

rm -rf "$WORK" || fail "cannot clear $WORK"
mkdir -p "$WORK" || fail "cannot create $WORK"
STAGE=$WORK/stage
PREFIX=$STAGE/moelm

DESTDIR=$STAGE "$CMAKE" --install "$MAIN_BUILD" --prefix /moelm >"$WORK/install.log" 2>&1 ||
    { cat "$WORK/install.log" >&2; fail "cmake --install of $MAIN_BUILD failed (log above)"; }
[ -f "$PREFIX/include/moe/plugin.h" ] || fail "expected $PREFIX/include/moe/plugin.h after the install, found none"
[ -d "$PREFIX/lib/cmake/moelm" ] || [ -d "$PREFIX/lib64/cmake/moelm" ] ||
    fail "expected the CMake package under $PREFIX/lib*/cmake/moelm, found none"

"$CMAKE" -S "$EXAMPLE_SRC" -B "$WORK/build" -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS=-Werror $CC_ARG >"$WORK/configure.log" 2>&1 ||
    { cat "$WORK/configure.log" >&2; fail "configuring the example against $PREFIX failed (log above)"; }
"$CMAKE" --build "$WORK/build" >"$WORK/build.log" 2>&1 ||
    { cat "$WORK/build.log" >&2; fail "building the example failed (log above)"; }
[ -f "$WORK/build/$SO" ] || fail "expected $WORK/build/$SO after the build, found none"

# the example must see the installed headers, not the source tree's
grep -rqs --include=flags.make --include=build.ninja "$PREFIX/include" "$WORK/build" ||
    fail "expected the example to compile with -I$PREFIX/include, found no such flag in its build files"

MOE_PLUGIN_PATH= "$TRAIN" --user-dir "$WORK/build" --list-plugins >"$WORK/list.txt" 2>&1 ||
    { cat "$WORK/list.txt" >&2; fail "$TRAIN --user-dir $WORK/build --list-plugins failed (output above)"; }
LINE=$(grep "^  $NAME " "$WORK/list.txt")
[ -n "$LINE" ] || { cat "$WORK/list.txt" >&2; fail "expected a line for $NAME in --list-plugins, found none (output above)"; }
case $LINE in
    *"$WORK/build/$SO"*) ;;
    *) fail "expected $NAME listed from $WORK/build/$SO, found: $LINE" ;;
esac
case $LINE in
    *"not loadable"*) fail "expected $NAME to load, found: $LINE" ;;
esac
if [ "$KIND" = gate ]; then
    MOE_PLUGIN_PATH= "$TRAIN" --user-dir "$WORK/build" --moe-gate "$NAME" --cpu --task dummy_lm \
        --tokens-per-sample 32 --dict-size 96 --arch transformer_lm_gpt --share-decoder-input-output-embed \
        --decoder-layers 2 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 \
        --moe-freq 2 --moe-expert-count 8 --criterion moe_cross_entropy --moe-gate-loss-wt 0.01 \
        --moe-gate-loss-combine-method sum --optimizer adam --lr 0.002 --batch-size 2 --log-format json \
        --log-interval 1 --max-update 4 --no-save --disable-validation >"$WORK/train.log" 2>&1 ||
        { cat "$WORK/train.log" >&2; fail "training with --moe-gate $NAME failed (log above)"; }
    grep -q '"num_updates": "4"' "$WORK/train.log" ||
        { cat "$WORK/train.log" >&2; fail "expected 4 updates logged with --moe-gate $NAME, found none"; }
fi
echo "example_build: ok: $LINE"
