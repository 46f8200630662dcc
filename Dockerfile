# kdpipe on a CUDA machine: the CUDA PyTorch image brings torch and torchvision; faiss-gpu
# replaces faiss-cpu (same `faiss` module), so K-means and top-k search run on the GPU.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/kdpipe
COPY pyproject.toml README.md ./
COPY kdpipe ./kdpipe
# torch is already in the image and satisfies `torch>=2.4`, so pip keeps it.
RUN pip install --no-cache-dir ".[faiss-gpu,imagenet]"

# Stores and run directories live on a volume, not in the image.
WORKDIR /work
ENTRYPOINT ["kdpipe"]
CMD ["--help"]
