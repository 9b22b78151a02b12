# edgeseg: distill -> calibrate -> export -> deploy -> profile.
# Variables: CONFIG=file.yaml  DEVICE=cpu|cuda|cuda:N  DATA=/folder/with/train+val  SET="a.b=1 c.d=2"
#            BASELINE=shipped|1|0 (the ground-truth-only student: the demo's shipped one, trained here, none)  TARGET=dir (unlabelled deployment images)  TORCH_SPEC="torch==X torchvision==Y"
#            TARGET_COUNT=N (target-domain pairs)  WITH_TEACHER=0 (bundle without the teacher)  PYTEST_ARGS="-k x"
#            STUDY_ARGS="--more-seeds"  PYTHON=python3.11  VENV=.venv
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EDGESEG := $(PY) -m edgeseg
CONFIG ?= configs/demo.yaml
DEVICE ?=
DATA ?=
SET ?=
BASELINE ?= shipped
TARGET ?=
# the calibration set's count: the export matrix compares calibration sets at equal counts
TARGET_COUNT ?= 128
WITH_TEACHER ?= 1
# The pair that works on these machines (../shared/SETUP.md, docs/design.md); on a Jetson or another CUDA build, pick yours.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

# run_dir of CONFIG, where every stage writes (asked of the config loader, so it is never repeated here)
RUN_DIR = $(shell $(EDGESEG) distill run-dir $(ARGS) 2>/dev/null || echo runs/demo)
ARGS := --config $(CONFIG) $(if $(DEVICE),--set device=$(DEVICE)) \
        $(if $(DATA),--set data.source=folder --set data.root=$(DATA)) $(foreach s,$(SET),--set $(s))
STAMP := $(VENV)/.edgeseg-installed

.PHONY: setup demo prepare generator teacher baseline distill calibrate calibrate-target export deploy check profile video serve bench study test test-all clean

setup: $(STAMP)

# torch first, from the pinned pair, so that installing the project does not pull another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q $(TORCH_SPEC)
	$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[train,dev]'
	# the CPU Triton server (tests, make serve): the binary only; the wheel's numpy<2 pin would break OpenCV 5
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps 'nvidia-pytriton==0.7.0'
	touch $@

# Each stage's wall time goes to $(RUN_DIR)/demo_times.tsv, printed as a table at the end (python -m benchmarks.run --only demo records it: docs/results.md).
demo: setup
	@start=$$(date +%s); times="$(RUN_DIR)/demo_times.tsv"; mkdir -p "$(RUN_DIR)"; printf 'stage\tseconds\n' > "$$times"; \
	for stage in prepare distill calibrate export deploy profile video; do \
	  t=$$(date +%s); $(MAKE) --no-print-directory $$stage || exit 1; \
	  printf '%s\t%s\n' $$stage $$(( $$(date +%s) - t )) >> "$$times"; \
	done; printf 'total\t%s\n' $$(( $$(date +%s) - start )) >> "$$times"; \
	echo "demo finished; seconds per stage ($$times):"; column -t "$$times"

# The shipped generator (calibration/assets/demo_generator, fp16): pretrained on the demo world's teacher
# corpus. `make demo` loads it; this rebuilds it (about 40 min on 2 cores; resumes from its checkpoint).
generator: setup
	$(EDGESEG) calibration generator $(ARGS) --steps 3000

# The data set (the demo's is generated once) and the teachers, checked: the shipped demo teachers' SHA-256,
# the feature teacher's ONNX (the shipped detector exported). Seconds; make demo's first stage.
prepare: setup
	$(EDGESEG) distill prepare $(ARGS)

# Rebuilds the shipped demo teachers (distill/assets/demo_teachers, fp16 + SHA-256): the B3 teacher on its corpus
# until val mIoU is flat (about 40 min on 2 cores), then the feature teacher (a detector). make demo does not run
# it. Resumable: run it again after a stop. In the background: nohup make teacher > teacher.log 2>&1 &
teacher: setup
	$(EDGESEG) distill train-teacher $(ARGS) --ship
	$(EDGESEG) distill train-feature-teacher $(ARGS) --ship

# Rebuilds the demo's shipped ground-truth-only student (the reports' baseline, the calibration report's judge):
# the student's schedule on the 150 labels alone (about 12 min on 2 cores; resumable). make demo installs it.
baseline: setup
	$(EDGESEG) distill train --baseline --ship $(ARGS)

# The student; then the ground-truth-only baseline beside it: BASELINE=shipped (the default) installs the demo's,
# or trains one where it does not fit (other data or settings); BASELINE=1 trains it here; BASELINE=0 skips it.
distill: setup
	$(EDGESEG) distill train $(ARGS)
	$(if $(filter 1,$(BASELINE)),$(EDGESEG) distill train --baseline $(ARGS))
	$(if $(filter shipped,$(BASELINE)),$(EDGESEG) distill install-baseline --or-train $(ARGS))
	$(EDGESEG) distill evaluate $(ARGS) $(if $(filter 1 shipped,$(BASELINE)),--with-baseline)

# The calibration set (source domain); then, when there are target images (the demo's 8, or TARGET=dir),
# labelled target-domain pairs: a target calibration set and extra distillation data (docs/calibration.md).
# Their labels are the conditioning masks: the teacher, itself hurt by the shift, does not filter them
# by its uncertainty (only by whether the person it finds matches the label, min_condition_iou).
calibrate: setup
	$(EDGESEG) calibration synth $(ARGS) --overwrite
	$(EDGESEG) calibration report $(ARGS)
	@$(MAKE) --no-print-directory calibrate-target

calibrate-target: setup
	@target="$(or $(TARGET),$(RUN_DIR)/data/target_images)"; if [ -d "$$target" ]; then \
	  cmd="$(EDGESEG) calibration synth $(ARGS) --images $$target --out $(RUN_DIR)/calibration/target \
	       --count $(TARGET_COUNT) --set calibration.filter.max_uncertain_fraction=1.0 --overwrite"; echo $$cmd; $$cmd; \
	else echo "no target images in $$target: target-domain pairs skipped (set TARGET=dir)"; fi

export: setup
	$(EDGESEG) export all $(ARGS)

# WITH_TEACHER=1 carries the teacher as ONNX (large), for `make check`'s teacher agreement.
deploy: setup
	$(EDGESEG) export bundle $(ARGS) $(if $(filter 1,$(WITH_TEACHER)),--with-teacher)

# The label-free site check of the bundle on a folder of frames (TARGET=dir; the demo's 8 target images).
check: setup
	$(EDGESEG) runtime check --bundle $(RUN_DIR)/bundle --images $(or $(TARGET),$(RUN_DIR)/data/target_images) \
	  --out $(RUN_DIR)/site_check

profile: setup
	$(EDGESEG) runtime profile --bundle $(RUN_DIR)/bundle --out $(RUN_DIR)/profile --batch 1,2,4,8 --iters 30

# The demo clip (<run_dir>/data/clip, made by prepare) through the bundle: mask and overlay videos in $(RUN_DIR)/video,
# with their mIoU and flicker against the clip's ground truth in summary.json.
video: setup
	$(EDGESEG) runtime infer --bundle $(RUN_DIR)/bundle --images $(firstword $(wildcard $(RUN_DIR)/data/clip/clip.mp4 $(RUN_DIR)/data/clip/clip.avi)) \
	  --out $(RUN_DIR)/video --truth $(RUN_DIR)/data/clip/masks

# Triton on 127.0.0.1 serving the demo bundle (ports printed); try it with tritonclient. Ctrl-C stops it.
serve: setup
	$(EDGESEG) serve triton --bundle $(RUN_DIR)/bundle --out $(RUN_DIR)/triton
	$(EDGESEG) serve start --repository $(RUN_DIR)/triton

bench: setup
	$(PY) -m benchmarks.run $(ARGS)

# The distillation study at convergence (benchmarks/study.py): hours on 2 cores, so it starts in the background,
# logs to $(RUN_DIR)/study.log and resumes per arm and seed when started again. Not part of bench or CI.
# STUDY_ARGS: e.g. "--more-seeds" (the single-seed arms on every seed), "--arms gt_only,kd_site".
STUDY_ARGS ?=
study: setup
	@log="$(RUN_DIR)/study.log"; pid="$(RUN_DIR)/study.pid"; mkdir -p "$(RUN_DIR)"; \
	if [ -f "$$pid" ] && kill -0 "$$(cat "$$pid")" 2>/dev/null; then \
	  echo "the study is already running (pid $$(cat "$$pid")): tail -f $$log"; exit 0; fi; \
	nohup $(PY) -m benchmarks.study $(ARGS) $(STUDY_ARGS) >> "$$log" 2>&1 & echo $$! > "$$pid"; \
	echo "the study runs in the background (pid $$!): tail -f $$log; results go to benchmarks/results/distill.json"

# The CPU test set (CI): slow, GPU and TensorRT tests are skipped, with the reason shown.
test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Removes the config's run folder (every stage's output; the shipped assets stay).
clean:
	@dir="$(RUN_DIR)"; case "$$dir" in ""|"/"|"."|"..") echo "refusing to remove '$$dir'"; exit 1;; esac; \
	echo "rm -rf $$dir"; rm -rf -- "$$dir"
