#!/usr/bin/env bash
# Issue 19's runs on the one-GPU machine, in phases that each fit a 10-minute command; the machine keeps its
# disk (data/, runs/) while calls follow each other, so a later phase resumes where the last one stopped.
#
#   bash recipes/scaling/h200.sh data               # icons, the corpus BPE, prepare SAMPLES samples (resumes)
#   bash recipes/scaling/h200.sh train 0 1 2        # dense and MoT per seed (resumes; SIGINT checkpoints)
#   TRAIN_ARGS="--name=scenes_10m_lr1e-3 --train.lr=1e-3" bash recipes/scaling/h200.sh train 0   # a sweep point
#   bash recipes/scaling/h200.sh compare 0 1 2      # the report over the finished runs
#   bash recipes/scaling/h200.sh collect DIR[.tgz]  # every run's logs, summaries, reports into DIR (or a tarball)
#   bash recipes/scaling/h200.sh gpu-tests LOG      # the GPU suite a module at a time, each module's report kept
#
# The device returns at most 8 files and drops the machine (and its disk) 30 s after a call ends: `train` with
# OUT set ends by writing $OUT/scaling_runs.tgz whatever happened, and the next call has to be issued at once.
#
# Knobs (environment):
#   RECIPE         recipes/scaling/scenes_10m.toml; scenes_4m.toml reads the same shards
#   NAME           the runs' name for compare (the recipe's; a sweep point's --name)
#   SAMPLES        1050000 samples to prepare into the recipe's data.shards
#   AUDIO_FRACTION 0: the share of samples with speech (0.25 for scenes_speech_4m.toml)
#   IMAGE_TOKENIZER tokenizers/demo/image (the 10M runs so far); tokenizers/scenes/image keeps far more of
#                  this corpus (docs/results/scaling/README.md, "The image codes")
#   DATA_S         the data phase's time limit in seconds (past it, it stops; the next call resumes)
#   TRAIN_S        the train phase's time limit (SIGINT then: a checkpoint, resumed by the next call)
#   UNTIL          instead of TRAIN_S, the epoch second a train or gpu-tests phase must end by
#   MODULE_S       gpu-tests: the limit per test module (240)
#   PREPARE_PROCS  2 prepare processes sharing DEVICE (cuda:0), with WORKERS (7) decode workers each
#   TRAIN_ARGS     recipe overrides, e.g. "--train.steps=4" for a try on the CPU
#   OUT            train: where to leave scaling_runs.tgz
# The icon theme comes as data/debs/oxygen-icon-theme_*.deb (docs/results/scaling/README.md says how to fetch
# it; carry data/debs).
set -euo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/../.."
RECIPE=${RECIPE:-recipes/scaling/scenes_10m.toml}
NAME=${NAME:-$(python3 -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1], 'rb'))['name'])" "$RECIPE")}
SAMPLES=${SAMPLES:-1050000}
AUDIO_FRACTION=${AUDIO_FRACTION:-0}
IMAGE_TOKENIZER=${IMAGE_TOKENIZER:-tokenizers/demo/image}
ICONS=data/icons/usr/share/icons/oxygen/base
TOK=data/scaling/tok
SHARDS=$(python3 -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1], 'rb'))['data']['shards'])" "$RECIPE")
MOT=(python3 -m mot.cli)
phase=${1:?phase: data, train, compare, collect or gpu-tests}
shift

case "$phase" in
data)
  if [ ! -d "$ICONS" ]; then
    dpkg -x data/debs/oxygen-icon-theme_*.deb data/icons
  fi
  if [ ! -f "$TOK/text/tokenizer.json" ]; then
    # the BPE is fit to samples of another seed, which no run trains or evaluates on
    "${MOT[@]}" tokenizer train text --data "synthetic:scenes?samples=4000&seed=99&audio_fraction=0&icon_dir=$ICONS" \
      --config tokenizers/text_demo.toml --out "$TOK/text"
  fi
  if [ ! -d "$TOK/image" ]; then  # the VQGAN every image of the session's shards is coded with
    cp -r "$IMAGE_TOKENIZER" "$TOK/image"
    echo "$IMAGE_TOKENIZER" > "$TOK/image_source.txt"
  fi
  if [ ! -d "$TOK/speech" ]; then cp -r tokenizers/demo/speech "$TOK/"; fi
  timeout -s INT "${DATA_S:-540}" python3 -m torch.distributed.run --standalone --nproc-per-node "${PREPARE_PROCS:-2}" -m mot.cli prepare \
    --recipe "$RECIPE" --tokenizers "$TOK" --out "$SHARDS" --device "${DEVICE:-cuda:0}" --workers "${WORKERS:-7}" \
    --data "synthetic:scenes?samples=$SAMPLES&seed=0&audio_fraction=$AUDIO_FRACTION&icon_dir=$ICONS"
  ;;
train)
  # SIGINT at TRAIN_S checkpoints the run in flight (timeout then exits 124); SIGKILL 60 s later if it hangs
  read -ra extra <<< "${TRAIN_ARGS:-}"
  limit=${TRAIN_S:-$([ -n "${UNTIL:-}" ] && echo $(( UNTIL - $(date +%s) )) || echo 520)}
  rc=0
  if [ "$limit" -lt 30 ]; then
    echo "train: ${limit}s left, not started" >&2
    rc=124
  else
    timeout -s INT -k 60 "$limit" "${MOT[@]}" compare --recipe "$RECIPE" --seeds "$@" --resume \
      "${extra[@]}" || rc=$?
  fi
  if [ -n "${OUT:-}" ]; then bash "$SELF" collect "$OUT/scaling_runs.tgz" || echo "collect failed" >&2; fi
  exit $rc
  ;;
compare)
  folders=()
  for seed in "$@"; do
    for run in "runs/$NAME-dense-s$seed" "runs/$NAME-mot-s$seed"; do
      if python3 -c "import json, sys; s = json.load(open(sys.argv[1])); sys.exit(s.get('step') != s.get('steps'))" \
          "$run/summary.json" 2>/dev/null; then
        folders+=("$run")
      else
        echo "compare: $run has not finished, left out" >&2
      fi
    done
  done
  "${MOT[@]}" compare "${folders[@]}" --out "runs/$NAME-compare"
  ;;
collect)
  out=${1:?collect DIR or DIR.tgz}
  if [[ "$out" == *.tgz ]]; then
    staging=$(mktemp -d)
    bash "$SELF" collect "$staging/scaling"
    tar czf "$out" -C "$staging" scaling
    rm -rf "$staging"
    exit 0
  fi
  mkdir -p "$out"
  for run in runs/*; do  # every recipe's runs, compare reports and sweep points (the machine starts empty)
    [ -d "$run" ] || continue
    mkdir -p "$out/$(basename "$run")"
    for f in log.jsonl summary.json config.json loss_curves.png compare.png compare_differences.png compare.md \
        compare.json; do
      if [ -f "$run/$f" ]; then cp "$run/$f" "$out/$(basename "$run")/"; fi
    done
    # the latest checkpoint's meta: the loader's epoch and cursor show how much of the corpus was read
    for meta in "$run"/checkpoints/step-*/meta.json; do
      if [ -f "$meta" ]; then cp "$meta" "$out/$(basename "$run")/checkpoint_meta.json"; fi
    done
  done
  for f in manifest.json prepare.json skipped.json; do
    if [ -f "$SHARDS/$f" ]; then cp "$SHARDS/$f" "$out/shards_$f"; fi
  done
  if [ -f "$TOK/image_source.txt" ]; then cp "$TOK/image_source.txt" "$out/"; fi
  ;;
gpu-tests)
  log=${1:?gpu-tests LOG}
  for module in tests/gpu/test_*.py; do
    limit=${MODULE_S:-240}
    if [ -n "${UNTIL:-}" ] && [ $(( UNTIL - $(date +%s) )) -lt "$limit" ]; then limit=$(( UNTIL - $(date +%s) )); fi
    if [ "$limit" -lt 20 ]; then echo "== $module: not run, past UNTIL" >> "$log"; continue; fi
    echo "== $module" >> "$log"
    timeout "$limit" python3 -m pytest -m gpu -s -q -rfE "$module" >> "$log" 2>&1 || echo "== $module: rc $?" >> "$log"
  done
  ;;
*)
  echo "unknown phase $phase: data, train, compare, collect or gpu-tests" >&2
  exit 2
  ;;
esac
