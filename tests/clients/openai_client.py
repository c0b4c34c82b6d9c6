"""Drive mistralrs-server with the official `openai` Python package: chat, completions, streaming.

Usage: python openai_client.py BASE_URL   (e.g. http://127.0.0.1:1234/v1). Exits non-zero with a
message on the first thing that is not what an OpenAI client expects.
"""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=300)

models = client.models.list()
ids = [m.id for m in models.data]
assert ids, "no models listed"

chat = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=16,
    temperature=0,
)
answer = chat.choices[0].message.content
assert answer and "Paris" in answer, f"chat answer: {answer!r}"
assert chat.usage.completion_tokens > 0, chat.usage

completion = client.completions.create(model="default", prompt="The capital of France is", max_tokens=8, temperature=0)
assert completion.choices[0].text, completion

pieces = []
finish = None
for chunk in client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Count from one to five."}],
    max_tokens=24,
    temperature=0,
    stream=True,
):
    if chunk.choices:
        delta = chunk.choices[0].delta
        if delta and delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
streamed = "".join(pieces)
assert streamed, "empty stream"
assert finish in ("stop", "length"), f"finish_reason {finish!r}"

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e

print(f"ok: models {ids}; chat {answer!r}; completion {completion.choices[0].text!r}; stream {streamed!r} ({finish})")
