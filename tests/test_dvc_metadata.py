"""What dvc.yaml tells DVC beyond the stages: the model registry entries (`artifacts:`) and the pipeline
diagram committed in docs/pipeline.md (`dvc dag --mermaid`)."""
import re

from helpers import REPO, run

from nanopipe import paths


def test_artifacts_are_the_models_in_dvcs_registry_format():
    from dvc.repo import Repo
    from dvc.repo.artifacts import check_name_format

    with Repo(str(REPO)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
        assert sorted(artifacts) == ["base", "hf", "rl", "sft"]
        for name, art in artifacts.items():
            check_name_format(name)  # raises on a name DVC / GTO would refuse
            assert art.type == "model" and art.desc and art.labels, name
            assert repo.artifacts.get_path(name) == art.path  # what `dvc artifacts get` resolves
        outs = {str(o.def_path) for s in repo.index.stages for o in s.outs}
    want = {**{n: paths.CHECKPOINTS[n] for n in ("base", "sft", "rl")}, "hf": paths.HF_EXPORT}
    assert {n: a.path for n, a in artifacts.items()} == {n: str(p) for n, p in want.items()}
    assert {str(p) for p in want.values()} <= outs  # each is a stage's output, so DVC can fetch it by name


MERMAID = re.compile(r"<!-- dvc dag --mermaid: begin -->\n```mermaid\n(.*?)```\n<!-- dvc dag --mermaid: end -->", re.DOTALL)


def test_the_committed_pipeline_diagram_is_current():
    """docs/pipeline.md holds `dvc dag --mermaid`; regenerate it with the command written above it."""
    committed = MERMAID.search((REPO / "docs/pipeline.md").read_text())
    assert committed, "docs/pipeline.md lost its mermaid block markers"
    assert committed.group(1).strip() == run(["dvc", "dag", "--mermaid"], REPO).stdout.strip()
