# Source on a lent GPU machine (torch 2.11 / transformers 5.17 / triton 3.6 image) from the repo root:
# installs the carried wheels (.whl/: hqq, termcolor, gguf, optimum-quanto) into /tmp/site and sets the
# environment every eval/gpu script expects. NVLink multicast stays off (the image's own rule).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/hqq*.whl .whl/termcolor*.whl .whl/gguf*.whl .whl/optimum_quanto*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 HF_ADAPTIVE_HOME=/tmp/hfa
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SMOL=/tmp/hfa/smollm2
mkdir -p /tmp/r  # every stage writes its results here and tars them into $OUT at the end
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$OUT/cards.txt"
