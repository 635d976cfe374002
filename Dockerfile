# The image every Ray pod runs (k8s/*.yaml): Ray, JAX on CUDA 12, and this project.
#   TAG=$(git rev-parse --short=12 HEAD)     # immutable: one tag per commit, never pushed twice
#   docker build -t ghcr.io/OWNER/raydeeplab:$TAG . && docker push ghcr.io/OWNER/raydeeplab:$TAG
# The Ray version in the tag, pyproject's ray pin and every manifest's rayVersion move together
# (tests/test_k8s.py). CUDA comes once: from jax[cuda12]'s NVIDIA wheels, which need only the
# node's driver, so the base is Ray's CPU image, not its CUDA one.
FROM rayproject/ray:2.60.0-py311

# RayJob entrypoints (`python jobs/train.py --config configs/...`) are relative to this folder:
# `ray start` runs here, and job drivers inherit its working directory.
WORKDIR /home/ray/raydeeplab

# Dependencies first, from pyproject.toml alone, so that a code edit reuses this layer instead
# of reinstalling JAX, TensorFlow and CUDA. Ray and its dependencies come with the base image and
# pip keeps them unless a pin needs otherwise. Ray's requirements_compiled.txt is not applied as
# constraints: it is the lock of Ray's own CI and pins fsspec 2023.12.1, which pyproject's
# s3fs>=2024.6 cannot use. JAX is pinned to the version the tests run (tests/test_k8s.py), and
# TensorFlow (only keras-hub's preprocessing imports it) is swapped for tensorflow-cpu at the
# same version, as Keras' own JAX-CUDA requirements do: it never claims the GPU from JAX.
COPY --chown=ray:users pyproject.toml .
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt "jax[cuda12]==0.10.2" \
 && pip uninstall -y tensorflow \
 && pip install --no-cache-dir --no-deps "tensorflow-cpu==2.21.0" \
 && rm /tmp/requirements.txt

# The code: the package, jobs/ and configs/ (.dockerignore keeps the rest out).
COPY --chown=ray:users . .
RUN pip install --no-cache-dir --no-deps .

# MPLCONFIGDIR: the pods' root filesystem is read-only; /tmp is an emptyDir.
ENV KERAS_BACKEND=jax \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLCONFIGDIR=/tmp/matplotlib
