"""The REST API the official agentkernel SDKs speak: FastAPI app, OpenAPI document, `serve`."""
