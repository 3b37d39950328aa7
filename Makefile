# The two commands of the README. Both create .venv on first use and reinstall when pyproject.toml
# or constraints.txt changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PRESET ?= quick

.PHONY: run test bench lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on disk; any other spec downloads CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/python -m pipeline run --preset $(PRESET)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/collect_throughput.py --set "collect.teachers.darkroom.seeds=[0,1,2,3]" --set collect.teachers.darkroom.budget=20000 --set "collect.teachers.darkroom.algo_config={learning_rate: 0.1, epsilon_decay: 0.8}"
	$(BIN)/python bench/collect_chunks.py
	$(BIN)/python bench/rllib_teacher.py
	$(BIN)/python bench/lean_dqn.py
	$(BIN)/python bench/lean_dqn_atari.py
	$(BIN)/python bench/lean_ppo.py
	$(BIN)/pip install --quiet -c constraints.txt stable-baselines3==2.9.2  # for the next benchmark only
	$(BIN)/python bench/sb3_teachers.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/train_job_cost.py
	$(BIN)/python bench/rollout_cache.py
	$(BIN)/python bench/evaluate_throughput.py

lock: $(VENV)/.installed  # after changing dependencies: pin what they resolved to
	{ head -n 2 constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
