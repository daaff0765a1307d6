# pedlightning: `make demo` trains and tests a reID model on built-in synthetic data; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export UV_PYTHON_DOWNLOADS := never

.PHONY: install demo demo-personmae demo-valpat demo-lcr2s test bench clean

install: $(VENV)/.installed

# uv, not pip: pip here prefers a local CPU-only torch wheel that the registry's torchvision cannot load
# next to. Versions are pinned in constraints.txt.
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set no .pyc is ever cached, and every process (each test
# subprocess, each spawned DDP child) compiled torch and Lightning again: `import lightning` took 12-16 s instead
# of 4-8 s on the shared 2-core machine; compiling once adds ~25 s to a fresh install. pedlightning itself
# (editable) is left alone: the whole package compiles in 0.3 s.
$(VENV)/.installed: pyproject.toml constraints.txt
	command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	uv venv -q --allow-existing --python "$$(command -v $(PYTHON))" $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install -q --compile-bytecode -e ".[dev,rich,tensorboard]" -c constraints.txt
	touch $@

# One torch thread: on a busy 2-core machine two threads made each step ~10x slower.
demo: install
	OMP_NUM_THREADS=1 $(VENV)/bin/pedlightning fit --config configs/demo/reid_market_synthetic.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/pedlightning test --config configs/demo/reid_market_synthetic.yaml --ckpt_path last

# PersonMAE: pre-train a small ViT on synthetic LUPerson shards, then fine-tune it on synthetic Occluded-Duke.
demo-personmae: install
	$(VENV)/bin/pedlightning fit --config configs/personmae/demo_pretrain_synthetic.yaml
	$(VENV)/bin/pedlightning fit --config configs/personmae/demo_finetune_synthetic.yaml
	$(VENV)/bin/pedlightning test --config configs/personmae/demo_finetune_synthetic.yaml --ckpt_path last

# VAL-PAT: pre-train a tiny ResNet + text tower on synthetic LUPerson-TA, then fine-tune it on synthetic Market-1501
# beside the same fine-tune from random initialisation; prints both test results.
demo-valpat: install
	$(VENV)/bin/pedlightning fit --config configs/valpat/demo_pretrain_synthetic.yaml
	mkdir -p runs/valpat_demo
	for init in valpat random; do \
	  extra=; [ $$init = random ] && extra="--model.init_args.encoder.pretrained=null"; \
	  $(VENV)/bin/pedlightning fit --config configs/valpat/demo_finetune_market_synthetic.yaml \
	    --trainer.default_root_dir=runs/valpat_demo/market_$$init $$extra || exit 1; \
	  $(VENV)/bin/pedlightning test --config configs/valpat/demo_finetune_market_synthetic.yaml \
	    --trainer.default_root_dir=runs/valpat_demo/market_$$init $$extra --ckpt_path last 2>&1 \
	    | tee runs/valpat_demo/market_$$init.log || exit 1; \
	done
	@echo; for init in valpat random; do printf '%-7s ' $$init; grep -h "reID test:" runs/valpat_demo/market_$$init.log; done

# LCR2S: support-set teacher -> distilled student -> test, beside the same student without distillation
# (synthetic CUHK-PEDES with partial captions).
demo-lcr2s: install
	$(VENV)/bin/pedlightning fit --config configs/lcr2s/demo_teacher_synthetic.yaml
	$(VENV)/bin/pedlightning fit --config configs/lcr2s/demo_student_synthetic.yaml
	$(VENV)/bin/pedlightning fit --config configs/lcr2s/demo_student_synthetic.yaml --model.init_args.feature_kd_weight=0 \
		--model.init_args.relation_kd_weight=0 --trainer.default_root_dir=runs/demo_lcr2s_student_nokd
	$(VENV)/bin/pedlightning test --config runs/demo_lcr2s_student/config.yaml --ckpt_path last \
		> runs/demo_lcr2s_student/test.log 2>&1 || (cat runs/demo_lcr2s_student/test.log; exit 1)
	$(VENV)/bin/pedlightning test --config runs/demo_lcr2s_student_nokd/config.yaml --ckpt_path last \
		> runs/demo_lcr2s_student_nokd/test.log 2>&1 || (cat runs/demo_lcr2s_student_nokd/test.log; exit 1)
	@grep -h "text-to-image test:" runs/demo_lcr2s_student/test.log | sed 's/^/LCR2S student (distilled):     /'
	@grep -h "text-to-image test:" runs/demo_lcr2s_student_nokd/test.log | sed 's/^/same student, no distillation: /'

test: install
	$(PY) -m pytest -q

bench: install
	VIRTUAL_ENV=$(VENV) uv pip install -q -e ".[bench-peers]" -c constraints.txt
	$(PY) benchmarks/reid_eval.py
	$(PY) benchmarks/personmae_throughput.py

clean:
	rm -rf runs lightning_logs .pytest_cache
