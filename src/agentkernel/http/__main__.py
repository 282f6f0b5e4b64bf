"""`python -m agentkernel.http > docs/openapi.json`: print the API's OpenAPI document."""

from __future__ import annotations

import json
import sys

from .app import create_app

if __name__ == "__main__":
    doc = create_app(None).openapi()  # type: ignore[arg-type]
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
