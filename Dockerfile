FROM python:3.11-slim

# The seed's build arguments; each can be overridden at `docker run -e` time too.
ARG RABBITMQ_HOST=rabbitmq
ARG RABBITMQ_PORT=5672
ARG RABBITMQ_USER=guest
ARG RABBITMQ_PASSWORD=guest
ARG REDIS_HOST=redis
ARG REDIS_PORT=6379
ARG REDIS_DB=0
ARG AUTHERIZATION_SERVER_HOST=http://auth-service
ARG AUTHERIZATION_SERVER_PORT=5206
ENV RABBITMQ_HOST=$RABBITMQ_HOST RABBITMQ_PORT=$RABBITMQ_PORT RABBITMQ_USER=$RABBITMQ_USER \
    RABBITMQ_PASSWORD=$RABBITMQ_PASSWORD REDIS_HOST=$REDIS_HOST REDIS_PORT=$REDIS_PORT REDIS_DB=$REDIS_DB \
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
# The web process (HTTP + websockets). Run the consumer from the same image with:
#   python manage.py run_saga_consumer
CMD ["sh", "-c", "exec uvicorn orchestration_site.asgi:application --host 0.0.0.0 --port ${PORT} --proxy-headers"]
