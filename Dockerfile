# syntax=docker/dockerfile:1
# streampipe and one pipeline folder (its services.yaml and stage modules), to run its stages as
# `streampipe run-stage STAGE` in containers: README, "Running on Kubernetes".
#
#   docker build -t registry.example/team/demo:1 .                                   # the default pipeline
#   docker build --build-arg PIPELINE=pipelines/mine -t registry.example/team/mine:1 .   # a folder of yours
#
# PIPELINE is a folder inside this build context; all of it is copied to /pipeline (.dockerignore
# leaves out caches, run directories, virtualenvs and CURVE secret keys), so stage modules, packages and input files
# beside services.yaml resolve as they do on your machine. The build fails if the pipeline does not
# pass `streampipe validate`. The pods mount their services.yaml (a ConfigMap) over the copy.
ARG PYTHON=3.12

FROM python:${PYTHON}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src src
COPY stages stages
COPY launcher launcher
COPY monitor monitor
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:${PYTHON}-slim
ARG PIPELINE=.
# HOME on the pod's /tmp (an emptyDir): the root filesystem is read-only there
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HOME=/tmp
RUN groupadd --system --gid 10001 streampipe \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin streampipe \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/streampipe
# the wheel is bind-mounted, not copied: no layer keeps it
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels pip install --no-cache-dir /wheels/*.whl
COPY ${PIPELINE}/ /pipeline/
WORKDIR /pipeline
USER 10001:10001
RUN streampipe validate --config /pipeline/services.yaml
# 5555 a stage's input, 5556 its acknowledgements, 9464 /healthz, /readyz and /metrics
EXPOSE 5555 5556 9464
ENTRYPOINT ["streampipe"]
CMD ["--help"]
