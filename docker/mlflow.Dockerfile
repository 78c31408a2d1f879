# syntax=docker/dockerfile:1
# The MLflow tracking server of the compose stack. The official ghcr.io/mlflow/mlflow image has neither
# psycopg2 (PostgreSQL backend store) nor boto3 (S3/MinIO artifact store), so this adds both.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Same MLflow major/minor floor as shapline's own pyproject.toml, so client and server agree.
RUN pip install "mlflow>=3.17,<4" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2"

RUN groupadd --gid 10001 mlflow \
    && useradd --uid 10001 --gid mlflow --create-home --shell /usr/sbin/nologin mlflow
# mlflow, by number (Kubernetes' runAsNonRoot can only verify a numeric user).
USER 10001:10001
WORKDIR /home/mlflow

EXPOSE 5000
# compose.yaml passes the real command (PostgreSQL backend, s3:// artifacts); this default is a bare server.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
