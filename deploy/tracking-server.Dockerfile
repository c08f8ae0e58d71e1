# The team tracking server (deploy/compose.yaml): MLflow with its basic-auth app, the PostgreSQL
# driver (psycopg 3) and boto3 for the S3 artifact store; versions as in uv.lock (a test checks).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg[binary]==3.3.9" "boto3==1.43.117" \
 && useradd --create-home --uid 1000 mlflow \
 && mkdir -p /var/lib/mlflow && chown mlflow /var/lib/mlflow
USER mlflow
WORKDIR /var/lib/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
