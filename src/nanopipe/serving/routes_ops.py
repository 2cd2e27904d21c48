"""Operations routes.

    GET /health  liveness + readiness (open even with an API key): 200 {"status": "ok", "ready": ...};
                 503 {"status": "unhealthy", ...} once the workers started and none is alive any more
                 (each decode worker restarts its own loop after a failure; see scheduler.py)
    GET /stats   workers, queue depth, active sequences, tokens served (the scheduler's stats;
                 {"detail": ...} 401 without the API key)
    GET /metrics the same and the server's own counts in Prometheus's text format (metrics.py;
                 401 without the API key: a scraper sends it as a bearer token)
"""
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nanopipe.serving.metrics import CONTENT_TYPE
from nanopipe.serving.state import UNAUTHORIZED, StateDep, detail_error

router = APIRouter()


@router.get("/health")
async def health(state: StateDep):
    scheduler = state.scheduler
    stats = scheduler.stats() if scheduler.started else None
    body = {"status": "ok", "ready": bool(scheduler.started), "num_gpus": len(scheduler.workers),
            "available_workers": stats["available_workers"] if stats else 0}
    if scheduler.started and not scheduler.healthy:
        dead = [f"worker {w.id}: {w.dead or 'thread exited'}" for w in scheduler.workers if not w.alive]
        return JSONResponse(status_code=503, content={**body, "status": "unhealthy", "ready": False,
                                                      "available_workers": 0, "problems": dead})
    return body


@router.get("/stats")
async def stats(request: Request, state: StateDep):
    if not state.authorized(request):
        return detail_error(401, UNAUTHORIZED)
    return state.scheduler.stats()


@router.get("/metrics")
async def metrics(request: Request, state: StateDep):
    if not state.authorized(request):
        return detail_error(401, UNAUTHORIZED)
    return Response(state.metrics.render(state.scheduler.stats()), media_type=CONTENT_TYPE)
