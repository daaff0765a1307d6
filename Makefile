# pedlightning: `make demo` trains and tests a reID model on built-in synthetic data; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export HF_HUB_OFFLINE := 1
export UV_PYTHON_DOWNLOADS := never

.PHONY: install demo demo-personmae demo-valpat demo-lcr2s test bench clean

install: $(VENV)/.installed

# uv, not pip: pip here prefers a local CPU-only torch wheel that the registry's torchvision cannot load
# next to (see NOTES.md). Versions are pinned in constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv
	uv venv -q --allow-existing --python "$$(command -v $(PYTHON))" $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install -q -e ".[dev,rich,tensorboard]" -c constraints.txt
	touch $@

demo: install
	$(VENV)/bin/pedlightning fit --config configs/demo/reid_market_synthetic.yaml
	$(VENV)/bin/pedlightning test --config configs/demo/reid_market_synthetic.yaml --ckpt_path last

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

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/reid_eval.py
	$(PY) benchmarks/personmae_throughput.py

clean:
	rm -rf runs lightning_logs .pytest_cache
