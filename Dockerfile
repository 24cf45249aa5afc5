# mistralrs-cli, CPU image: mistralrs-server on port 80, the Hugging Face cache in the /data volume.
#   docker build -t mistralrs-cli:cpu .
#   docker run -p 1234:80 -v ~/.cache/huggingface:/data mistralrs-cli:cpu gguf -m REPO -f FILE.gguf
# Never built where this project is developed (no Docker daemon there): tests/test_docker_files.py
# checks that the install steps below are the README's ("Docker" section), line for line.
FROM python:3.11-slim-bookworm

# the native CPU runtime compiles its C kernels with the system compiler on first use
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV HF_HOME=/data \
    MISTRALRS_CLI_CACHE=/data/mistralrs-cli \
    PATH=/mistralrs/.venv/bin:$PATH

WORKDIR /mistralrs
COPY . .

# install: the README's steps
RUN python3 -m venv .venv
RUN .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
RUN .venv/bin/pip install .

VOLUME /data
EXPOSE 80
ENTRYPOINT ["mistralrs-server", "--host", "0.0.0.0", "--port", "80", "--token-source", "env"]
CMD ["--help"]
