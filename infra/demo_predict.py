"""The demo's last step: start the HTTP API, ask it for a prediction, merged features and a
SQL answer, print them, and stop it (`lambdalake serve` runs it for good)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lakehouse.config import load_settings
from lakehouse.spec import format_timestamp_ms


def main() -> None:
    settings = load_settings()
    url = f"http://{settings.api_host}:{settings.api_port}"
    api = subprocess.Popen([str(Path(sys.executable).parent / "lambdalake"), "serve"])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if api.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the API did not become ready; see the lines above")
            time.sleep(0.5)
        configured = settings.api_keys.get_secret_value()
        entries = configured.split(",") if configured else settings.api_keys_path.read_text().splitlines()
        key = next(e.strip().split(":")[1] for e in entries if e.strip() and not e.startswith("#"))
        headers = {"X-API-Key": key}
        top = httpx.post(f"{url}/v1/sql", headers=headers, timeout=30, json={
            "query": "SELECT user_id, count, mean_amount FROM merged.user_all ORDER BY count DESC LIMIT 1"}).json()
        user = top["rows"][0]["user_id"]
        merchant = httpx.post(f"{url}/v1/sql", headers=headers, timeout=30, json={
            "query": "SELECT merchant_id FROM merged.merchant_all ORDER BY count DESC LIMIT 1"}).json()
        event = {"event_id": "demo-1", "user_id": user, "merchant_id": merchant["rows"][0]["merchant_id"],
                 "merchant_category": "gift_cards", "amount": 899.99, "currency": "EUR", "country": "BR",
                 "channel": "online", "event_time": format_timestamp_ms(int(time.time() * 1000))}
        prediction = httpx.post(f"{url}/v1/predict", headers=headers, json=event, timeout=30).json()
        features = httpx.get(f"{url}/v1/entities/user_id/{user}/features", headers=headers, timeout=30).json()
        print(json.dumps({"sql": top["rows"], "predict": prediction,
                          "features": features["views"]["user_all"]}, indent=2))
        print(f"API keys: {settings.api_keys_path}; run the API with `lambdalake serve` ({url}/docs)")
    finally:
        api.terminate()
        api.wait(timeout=30)


if __name__ == "__main__":
    main()
