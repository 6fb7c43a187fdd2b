"""A fast stand-in for an OpenAI-compatible chat server on loopback, for
measuring row jobs (scripts/rowjob-bench.sh): asyncio, HTTP/1.1 keep-alive,
each answer "A short answer to: <the prompt>" at once. Not a test double of
the protocol (the tests use mmembed-llm's fake); only fast.

    python3 scripts/lib/fake_openai.py PORT [MAX_DELAY_MS]

With MAX_DELAY_MS, each answer waits a uniform random 0..MAX_DELAY_MS
first, as a server's varying latency.
"""
import asyncio, json, random, sys

MAX_DELAY = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"): n = int(line.split(b":")[1])
            body = json.loads(await r.readexactly(n))
            if MAX_DELAY:
                await asyncio.sleep(random.uniform(0, MAX_DELAY))
            text = body["messages"][-1]["content"]
            if isinstance(text, list): text = " ".join(p.get("text", "") for p in text)
            out = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "A short answer to: " + text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 12, "total_tokens": 22}}).encode()
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(out) + out)
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await s.serve_forever()
asyncio.run(main())
