# kdpipe on a CUDA machine: the PyTorch image brings torch 2.5.1+cu124 and torchvision (Python
# 3.11); the gpu extra adds faiss-gpu-cu12 (K-means and top-k search on the GPU), whose only
# CUDA requirements are lower bounds the image's nvidia-* packages already meet.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/kdpipe
COPY pyproject.toml README.md ./
COPY kdpipe ./kdpipe
# The image's torch, torchvision, triton and CUDA libraries, pinned as constraints: pip resolves
# kdpipe's requirements around them and fails instead of replacing them
# (tests/test_install.py resolves this same line against the image's versions).
RUN pip list --format=freeze | grep -E '^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+)==' > /tmp/image-constraints.txt \
    && pip install --no-cache-dir -c /tmp/image-constraints.txt ".[gpu,imagenet]"

# Stores and run directories live on a volume mounted at /work, not in the image:
#   docker run -v /data/kdpipe:/work kdpipe extract-teacher ... --out /work/stores/rn32x4.zarr
WORKDIR /work
VOLUME /work
ENTRYPOINT ["kdpipe"]
CMD ["--help"]
