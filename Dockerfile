# The podpipe base image: the conductor and every stage that is a Python function.
#
#   docker build -t podpipe:0.1.0 .
#
# Your stage code goes in a derived image, under /app (the working directory the
# rendered containers use, and where relative paths in the spec resolve):
#
#   FROM podpipe:0.1.0
#   COPY --chown=10001:10001 mystages/ /app/mystages/
#   RUN pip install --no-cache-dir -r /app/mystages/requirements.txt   # if any
#
# Stages that are commands in another language need their runtime in the image
# that the stage's `image:` names (for example node for a JavaScript stage).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY pyproject.toml README.md /src/
COPY src /src/src
RUN pip install --no-cache-dir /src && rm -rf /src \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp podpipe \
    && mkdir -p /app && chown 10001:10001 /app

USER 10001:10001
WORKDIR /app
CMD ["podpipe", "--help"]
