FROM python:3.11-slim

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
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .
RUN DJANGO_DEBUG=1 python manage.py collectstatic --no-input \
    && useradd --create-home --uid 10001 app && chown -R app /app
USER app

EXPOSE 7001
# The web process (HTTP + websockets). Inside the container it listens on every interface;
# where it is published is the host's choice (docker-compose.yml: 127.0.0.1 only).
# Run the consumer from the same image with:  python manage.py run_saga_consumer
CMD ["sh", "-c", "exec uvicorn orchestration_site.asgi:application --host 0.0.0.0 --port ${PORT} --proxy-headers"]
