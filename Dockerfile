# The image every Ray pod runs (k8s/*.yaml): Ray, CUDA JAX and this project, code included.
#   docker build -t ghcr.io/OWNER/raydeeplab:0.1.0 . && docker push ghcr.io/OWNER/raydeeplab:0.1.0
# The Ray version in the tag, pyproject's ray pin and every manifest's rayVersion move together
# (tests/test_k8s.py). `-gpu` is rayproject's alias for its default CUDA build; jax[cuda12]
# brings its own CUDA 12 libraries as wheels and needs only the node's NVIDIA driver.
FROM rayproject/ray:2.60.0-py311-gpu

# The base image runs as user `ray`; COPY --chown creates the folder owned by it, so the
# in-tree wheel build below can write there.
COPY --chown=ray:users . /home/ray/raydeeplab
# RayJob entrypoints (`python jobs/train.py --config configs/...`) are relative to this folder:
# `ray start` runs here, and job drivers inherit its working directory.
WORKDIR /home/ray/raydeeplab

# Ray 2.60.0 is already in the base image, so pip keeps it and adds the rest of
# ray[data,train,serve], keras/keras-hub, and jax[cuda12] from the `cuda` extra.
RUN pip install --no-cache-dir ".[cuda]"

ENV KERAS_BACKEND=jax \
    TF_CPP_MIN_LOG_LEVEL=2
