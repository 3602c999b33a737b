# Source this first in a GPU-machine command, from the repository root:  source benchmarks/device_setup.sh
#
# The GPU machine (Python 3.12, x86-64) has torch, torchvision, transformers, accelerate, safetensors,
# huggingface_hub, numpy, pillow, opencv-python-headless, jinja2, httpx, anyio, h11, prometheus-client, psutil,
# click, pyyaml and uvloop, and no network. What the server and the benchmarks still need comes as wheels in .whl/
# (ignored by git; carry it: run(carry=[".whl"])), the versions of this checkout's .venv (pip freeze), fetched with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl NAME==VERSION ...
# (11 MB in all):
#   diffusers-0.42.1            py3-none-any      (needs requests at import: pipeline_utils)
#   fastapi-0.165.0             py3-none-any      (imports opentelemetry-api at import: fastapi.telemetry)
#   fastapi_offline-1.7.7       py3-none-any      (service/docs_page.py: /docs without a CDN)
#   starlette-1.10.0            py3-none-any
#   uvicorn-0.54.0              py3-none-any      (no [standard] extras: h11 for HTTP, websockets for WebSockets)
#   websockets-17.4             cp312 manylinux
#   pydantic-2.14.4             py3-none-any
#   pydantic_core-2.50.5        cp312 manylinux
#   annotated_types-0.8.0       py3-none-any
#   annotated_doc-0.0.7         py3-none-any      (fastapi)
#   typing_inspection-0.4.5     py3-none-any
#   typing_extensions-4.16.0    py3-none-any      (pydantic 2.14 wants >= 4.16)
#   opentelemetry_api-1.45.2    py3-none-any
#   simplejpeg-1.9.0            cp312 manylinux
#   requests-2.34.2, urllib3-2.8.0, certifi-2026.10.19.post1   py3-none-any
#   charset_normalizer-3.5.3    cp312 manylinux
# Not included: matplotlib (the benchmarks then skip their plots), httptools / python-multipart (not used).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
