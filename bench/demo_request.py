"""Write the README demo: docs/trained/demo.png and docs/trained/demo_request.json (from synthvqa's
fixed-seed demo sample), and print the curl command and the expected answer."""
import json
from pathlib import Path

from popserve.models import synthvqa

out = Path(__file__).resolve().parents[1] / "docs" / "trained"
out.mkdir(parents=True, exist_ok=True)
demo = synthvqa.demo_sample()
demo.image.save(out / "demo.png", optimize=True)
body = {"model": "default", "messages": demo.openai_messages(), "max_tokens": 16, "temperature": 0}
(out / "demo_request.json").write_text(json.dumps(body, indent=1) + "\n")
print("question:", demo.question)
print("expected answer:", demo.answer)
print("curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' -d @docs/trained/demo_request.json")
