# The README's commands. Each one sets up everything it needs on a fresh machine (scripts/setup_env.sh).
PY := .venv/bin/python
# Tests: Triton kernels through the interpreter on CPU; a missing C++ extension or Triton fails the run.
TEST_ENV := TRITON_INTERPRET=1 LRKERN_POISON_EMPTY=1 LRKERN_REQUIRE_CPP=1 LRKERN_EXPECT_BACKENDS=cpp,triton,reference

.PHONY: setup demo lance-demo lance video-demo video bench-quick test bench plot gpu clean

setup:
	@scripts/setup_env.sh

# KVLinC on the packaged SmolLM2-135M: fp16 cache vs 2-bit KVLinC replies, KV bytes, tokens/s, perplexity (~40 s).
demo: setup
	.venv/bin/lrkern kvlinc demo

# LANCE on MNIST: BP vs LANCE fine-tuning of a small CNN's conv2/conv3, bytes/accuracy/step time (~1 min after a
# one-time ~1-2 min Fashion-MNIST pretraining that is cached).
lance-demo: setup
	.venv/bin/lrkern lance demo

# The LANCE experiments of bench/results/lance.{json,md}: fine-tuning (~25 min) and continual learning (~8 min), CPU.
lance: setup
	$(PY) bench/lance_finetune.py
	$(PY) bench/lance_continual.py

# Compressed-domain video recognition (spiking temporal modulators) on a small synthetic motion set: I-frame-only vs
# the full model, accuracy, videos/s, energy estimate (~5 min on 2 cores, incl. a one-time ~40 s dataset build).
video-demo: setup
	.venv/bin/lrkern video demo

# The experiment of bench/results/video_model.{json,md}: 5 models on the 2240-clip synthetic set (~25 min on 2 idle cores,
# plus ~2 min to build the set once).
video: setup
	$(PY) bench/video_model.py

# The op microbenchmarks on CPU without recording (Hadamard, quant, LANCE projection and layer steps, 2-bit KV decode
# attention vs SDPA), ~40 s.
bench-quick: setup
	$(PY) bench/run_all.py --device cpu --quick --no-record

test: setup
	$(TEST_ENV) $(PY) -m pytest tests

bench: setup
	$(PY) bench/run_all.py --device auto

plot: setup
	$(PY) bench/plot.py

# On a CUDA machine whose torch is already installed: build, run the tests on CUDA and every benchmark.
gpu:
	@scripts/gpu.sh

clean:
	rm -rf build lrkern/_C*.so lrkern.egg-info
