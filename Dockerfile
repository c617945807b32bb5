# The podpipe base image: the conductor and every stage that is a Python function.
#
#   docker build -t podpipe:0.1.0 .
#
# Everything is installed into a virtual environment under /opt/podpipe, as root,
# before `USER`: the rendered pods run with a read-only root filesystem and a small
# volume on /tmp (HOME), so a `pip install` run as the user would land in a user site
# under /tmp and be hidden at run time.
#
# Your stage code goes in a derived image, under /app (where the rendered containers
# import it from; the spec's relative data paths resolve on the data volume, /data):
#
#   FROM podpipe:0.1.0
#   USER root
#   COPY mystages/ /app/mystages/
#   RUN pip install --no-cache-dir -r /app/mystages/requirements.txt   # into /opt/podpipe
#   USER 10001:10001
#
# or, building this image, `--build-arg REQUIREMENTS="polars==1.* scikit-learn"`.
# Stages that are commands in another language need their runtime in the image that
# the stage's `image:` names (for example node for a JavaScript stage).
FROM python:3.11-slim

ARG REQUIREMENTS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/podpipe \
    PATH=/opt/podpipe/bin:$PATH

COPY pyproject.toml README.md /src/
COPY src /src/src
RUN python -m venv /opt/podpipe \
    && pip install --no-cache-dir /src ${REQUIREMENTS} && rm -rf /src \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp podpipe \
    && mkdir -p /app && chown 10001:10001 /app

USER 10001:10001
WORKDIR /app
CMD ["podpipe", "--help"]
