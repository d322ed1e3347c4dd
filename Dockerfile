FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . && useradd --create-home promptq
USER promptq
ENTRYPOINT ["promptq"]
CMD ["worker"]
