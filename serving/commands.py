"""``raypeft serve``: validate the serving spec, start Ray and Serve, deploy, and wait."""

from __future__ import annotations

import time

from serving import spec as serve_spec


def serve(args) -> int:
    """Deploy the serving spec's application; wait until interrupted unless ``--detach``."""
    spec = serve_spec.load(args.spec, args.overrides)  # exit 2 on a bad spec, before Ray starts
    if any(s.startswith("models:/") for s in spec.adapters.values()):
        from pipelines import tracking

        tracking.check_server(spec.tracking_uri or tracking.tracking_uri())  # registry sources: exit 2 now
    from ray import serve

    from cluster.connect import init_ray
    from serving.app import build_app

    init_ray()
    d = spec.deployment
    serve.start(http_options={"host": d.host, "port": d.port})
    serve.run(build_app(spec), name=spec.name, route_prefix="/")
    url = f"http://{d.host}:{d.port}"
    print(f"[raypeft] serving {spec.base_name()} at {url}/v1 (models: {url}/v1/models)", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(spec.name)
        return 0
