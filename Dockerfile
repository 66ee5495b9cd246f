# Two images from one file:
#   docker build --target runtime -t orchestrator .      the service, what production runs
#   docker build --target demo -t orchestrator-demo .    + the demo neighbours (docker compose --profile demo)
# The runtime image holds the service only (manage.py, orchestration_site, sagas): the demo app
# (demo/: participants, auth service, its commands) and its settings go to the demo image; the lab
# (lab/: benchmark, fault suite) and tests/ stay in the `source` stage, in no image's layers.
FROM python:3.11-slim AS base

# The seed's build arguments that are not secret, kept as the image's defaults; each can be
# overridden with `docker run -e` too. Secrets are not build arguments: a build argument's value
# stays readable in the image's history and provenance. RABBITMQ_PASSWORD (and the other
# secrets) are read at run time only, from the environment or a file: `docker run -e
# RABBITMQ_PASSWORD_FILE=/run/secrets/rabbitmq_password ...`. The seed's
# `--build-arg RABBITMQ_PASSWORD=...` still builds; docker warns that it was not consumed.
ARG RABBITMQ_HOST=rabbitmq
ARG RABBITMQ_PORT=5672
ARG RABBITMQ_USER=guest
ARG REDIS_HOST=redis
ARG REDIS_PORT=6379
ARG REDIS_DB=0
ARG AUTHERIZATION_SERVER_HOST=http://auth-service
ARG AUTHERIZATION_SERVER_PORT=5206
ENV RABBITMQ_HOST=$RABBITMQ_HOST RABBITMQ_PORT=$RABBITMQ_PORT RABBITMQ_USER=$RABBITMQ_USER \
    REDIS_HOST=$REDIS_HOST REDIS_PORT=$REDIS_PORT REDIS_DB=$REDIS_DB \
    AUTHERIZATION_SERVER_HOST=$AUTHERIZATION_SERVER_HOST AUTHERIZATION_SERVER_PORT=$AUTHERIZATION_SERVER_PORT \
    PORT=7001 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
RUN useradd --create-home --uid 10001 app

# The whole build context, split in two: what production runs, and the demo's part.
FROM base AS source
COPY . /src
RUN mkdir -p /demo/orchestration_site \
    && mv /src/demo /demo/demo \
    && mv /src/orchestration_site/settings_demo.py /demo/orchestration_site/ \
    && mkdir /service && mv /src/manage.py /src/orchestration_site /src/sagas /service/

FROM base AS runtime
# the lock's exact files: a package whose hash is not in requirements.txt is refused
COPY requirements.txt .
RUN pip install --no-cache-dir --require-hashes -r requirements.txt
COPY --from=source /service /app
RUN DJANGO_DEBUG=1 python manage.py collectstatic --no-input && mkdir -p /app/var && chown app /app/var
USER app
EXPOSE 7001
# The web process (HTTP + websockets). Inside the container it listens on every interface;
# where it is published is the host's choice (docker-compose.yml: 127.0.0.1 only).
# Run the consumer from the same image with:  python manage.py run_saga_consumer
# The logs of uvicorn itself take the service's format (orchestration_site/logging_config.py).
# Ready when the database, Redis and RabbitMQ answer (GET /readyz; the slim image has no curl). A
# consumer run from this image overrides it with: python manage.py consumer_health
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["sh", "-c", "exec python -c \"import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '7001') + '/readyz', timeout=3)\""]
CMD ["sh", "-c", "exec uvicorn orchestration_site.asgi:application --host 0.0.0.0 --port ${PORT} --proxy-headers --log-config orchestration_site/uvicorn_logging.json"]

FROM runtime AS demo
USER root
COPY requirements-demo.txt .
RUN pip install --no-cache-dir --require-hashes -r requirements-demo.txt
COPY --from=source /demo /app
# the only settings that install the demo app (its commands refuse to run under any other)
ENV DJANGO_SETTINGS_MODULE=orchestration_site.settings_demo
USER app
CMD ["python", "manage.py", "run_demo_participants", "--auth-host", "0.0.0.0"]
