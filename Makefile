# One place for the commands the README quotes.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export OMP_NUM_THREADS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test train bench gpu-check gpu-tune gpu-tune-late gpu-train-long gpu-train-waits gpu-optimizer gpu-dq-fused gpu-head-dim-128 gpu-suite gpu-wheels clean slurm-up slurm-down

# torch first, pinned to the CPU wheel: letting the resolver pick torch would pull a multi-GB CUDA build.
# deepspeed ships only an sdist whose setup.py imports torch, hence --no-build-isolation.
# Triton's interpreter runs the fused GPU kernels' tests on a CPU-only torch (triton >= 3.9: older
# interpreters break on numpy >= 2.4); a CUDA torch brings its own matching triton, left alone.
setup:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	$(PYTHON) -c "import torch, sys; sys.exit(torch.version.cuda is not None)" && $(PIP) install -q "triton>=3.9" || true

# The fused kernels' interpreter tests (one core each, no subprocesses) first, on two pytest-xdist workers of one
# thread each; then every other test on two workers, a file at a time per worker (--dist loadfile: a file's module
# and session fixtures, its SLURM cluster or trained runs, are made once, in one worker; the tests start ranks and
# servers of their own on free ports). Both always run.
INTERPRETED := tests/test_triton_kernels.py tests/test_triton_nesting.py tests/test_triton_head_dims.py
test: setup
	status=0; \
	OMP_NUM_THREADS=1 WANDB_MODE=disabled $(PYTHON) -m pytest $(INTERPRETED) -q -n 2 || status=$$?; \
	WANDB_MODE=disabled $(PYTHON) -m pytest tests -q -n 2 --dist loadfile $(addprefix --ignore=,$(INTERPRETED)) \
		|| status=$$?; \
	exit $$status

# One run directory per `make train` (named like the trainer's default output_dir, fixed once per make
# call so both commands see the same one); the run ends by printing a sample from its final checkpoint.
# tcmalloc when installed (launch/cpu_allocator.sh): faster CPU steps; LONGNET_TCMALLOC=0 turns it off.
RUN_DIR := $(or $(RUN_DIR),outputs/$(shell date +%Y-%m-%d_%H-%M-%S))
train: setup
	preload="$$(launch/cpu_allocator.sh)" && LD_PRELOAD="$$preload" $(PYTHON) -m longnet_dist.train trainer.output_dir=$(RUN_DIR)
	$(PYTHON) -m longnet_dist.generate checkpoint=$(RUN_DIR) prompt="def " max_new_tokens=200

bench: setup
	$(PYTHON) benchmarks/attention.py

# The targets run after gpu-check on the same machine start from its kernel_tuning.json (unless LONGNET_KERNEL_TUNING
# names another)
WITH_CHECK_TUNING = LONGNET_KERNEL_TUNING=$${LONGNET_KERNEL_TUNING:-$$(ls -t $${OUT:-benchmarks/results}/kernel_tuning.json 2>/dev/null | head -1)}

# on a CUDA machine (needs no `setup`): CUDA tests + attention benchmark, profile and host time + a 32K training run,
# stages limited to 7.7 minutes, results in benchmarks/results/ (scripts/gpu_check.sh)
gpu-check:
	scripts/gpu_check.sh

# the kernel settings re-timed against their alternatives (dQ mode, shared keys, small launches, side branches, block
# shapes, TMA loads), written to kernel_tuning.json; at most 175 s
gpu-tune:
	GPU_CHECK_STAGES=tune scripts/gpu_check.sh

# after gpu-check, on the same machine: the 16-bit r = 1 branch run last against first (fused_settings.COVERING_LAST,
# stops 31-32), each kernel's loop split into warp groups by Triton (fused_settings.WARP_SPECIALIZE, written in stop
# 31; then the split 7-product backward against "tma"), then TMA loads per kernel, none of them timed on a GPU yet,
# each kept if faster and within bf16, written to kernel_tuning.json; at most 170 s
gpu-tune-late:
	$(WITH_CHECK_TUNING) \
	GPU_CHECK_STAGES=tune-late scripts/gpu_check.sh

# 1M- and 4M-token training steps of `model=base` through the real trainer (dilated); at most 210 s
gpu-train-long:
	$(WITH_CHECK_TUNING) \
	GPU_CHECK_STAGES=train-long scripts/gpu_check.sh

# after gpu-check, on the same machine (its kernel_tuning.json): the 32K dilated training point with the step's
# waits for the GPU put back (DeepSpeed's throughput timer, the host-side overflow check), to set beside gpu-check's
# train row; at most 100 s
gpu-train-waits:
	$(WITH_CHECK_TUNING) \
	GPU_CHECK_STAGES=train-waits scripts/gpu_check.sh

# after gpu-check, on the same machine (its kernel_tuning.json): DeepSpeed's two bf16 optimizer wrappers timed
# (the engine's share of a step; gpu-check's train stage already profiles a 32K step); about 1.5 minutes
gpu-optimizer:
	$(WITH_CHECK_TUNING) \
	GPU_CHECK_STAGES=optimizer scripts/gpu_check.sh

# after gpu-check, on the same machine (its kernel_tuning.json): the backward with dQ from the dK/dV loop ("tma",
# "atomic": 5 matrix products per block pair instead of 7) on the block shapes that do not spill, against the
# separate dQ kernel, then 32K and 1M with the fastest; results in <results>/dq_fused/; at most 240 s
gpu-dq-fused:
	$(WITH_CHECK_TUNING) \
	GPU_CHECK_STAGES=dq-fused scripts/gpu_check.sh

# after gpu-check, on the same machine: the attention points at head_dim 128 (6 heads: the paper's FLOPs), on the
# blocks stop 33 chose for it without a GPU, against dense flash attention at 128; results in <results>/d128/; 110 s
gpu-head-dim-128:
	$(WITH_CHECK_TUNING) \
	GPU_CHECK_STAGES=head-dim-128 scripts/gpu_check.sh

# on a CUDA machine: every test that gpu-check's tests stage does not run, with CUDA present (what `make test` on a
# workstation with a GPU runs, less the SLURM tests); needs gpu-wheels' .whl/ on an offline machine; at most 240 s
gpu-suite:
	GPU_CHECK_STAGES=suite scripts/gpu_check.sh

# here, before a lease: the wheels an offline CUDA machine lacks, for gpu-check's train stages and gpu-suite, into
# .whl/ (git-ignored): ../shared/offline_wheels.sh's DeepSpeed and Hydra, and safetensors (Python 3.12 builds)
gpu-wheels:
	../shared/offline_wheels.sh .whl
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 -d .whl "safetensors>=0.4"

clean:
	rm -rf outputs .pytest_cache build *.egg-info slurm-*.out slurm-*.err

# a real one-node SLURM cluster on this machine (root, Debian): what tests/test_slurm.py uses
slurm-up:
	scripts/slurm_local.sh start

slurm-down:
	scripts/slurm_local.sh stop
