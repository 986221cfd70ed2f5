"""The field app: a Raspberry Pi serves a screening page to the phones around it.

    pip install ".[edge,serve]"
    python -m edge_runtime serve --models malaria_tflite-int8.tflite oct_tflite-int8.tflite [--host 0.0.0.0]

- `analysis`: what an upload becomes (image checks, `analyse_slide` for malaria,
  `predict` + Grad-CAM for OCT, one lock per model); no web framework.
- `verdict`: a malaria case's report for the health worker (verdict, action, count, guidance, retakes).
- `storage`: cases in SQLite (WAL) with their files, stored whole or not at all.
- `app`: the Starlette application (HTTP API, access code, limits, the page).
- `server`: the `serve` verb (models, store, uvicorn; `--https` with plain HTTP beside it).
- `tls`: `serve --https`'s certificates (the device's own CA and the server certificate), with `openssl`.
- `static/`: the page (one HTML, one script, one style sheet, the service worker `sw.js`; no build step,
  nothing from the internet).

Only `app` and `server` import Starlette/uvicorn (the `serve` extra); `import
edge_runtime` never imports this package.
"""
