"""A research workbench for digital-health studies.

The public API, for notebooks and scripts::

    import workbench
    config = workbench.load_config("~/sleep-lab")
    catalog = workbench.open_catalog(config)
    workbench.create_study(catalog, workbench.definition_from_options("sleep", duration_days=28))
    people = workbench.enroll(catalog, "sleep", 10)
    problems = workbench.verify(config)
    workbench.refresh_status(config)                   # status, history, alerts, CSVs
    table = workbench.study_status(catalog, "sleep")   # a polars DataFrame
    alerts = workbench.list_alerts(catalog, "sleep")
    report = workbench.sanity_check(config)
    workbench.export_sources(config)                    # questionnaires, decrypted
    phq9 = workbench.combine_table(config, "mindtrails", "PHQ9")
    scored = workbench.score(phq9, "phq9")              # phq9_total, phq9_band, ...
    change = workbench.change_over_time(scored, "phq9")  # response, remission, RCI
    retention = workbench.attrition(config, "sleep").retention
    record = workbench.run_pipeline(config, "status")   # a notebook run, tracked as a job
    days = workbench.features(config, "sleep")          # behavioural features per subject-day
"""

import importlib
from typing import TYPE_CHECKING

from workbench import errors as _errors
from workbench.errors import WorkbenchError

# Every error type, so `except workbench.UnknownStudy:` works (errors imports nothing heavy).
_ERRORS = sorted(
    name
    for name, value in vars(_errors).items()
    if isinstance(value, type) and issubclass(value, WorkbenchError)
)
globals().update({name: getattr(_errors, name) for name in _ERRORS})

# What each public name is imported from. `import workbench` stays fast: a module (and the
# heavy libraries it needs, polars or SQLAlchemy) is imported when one of its names is first used.
_LAZY = {
    "ack_alert": "workbench.alerts",
    "archive_study": "workbench.studies",
    "build_tables": "workbench.sensors.tables",
    "data_yield": "workbench.sensors.yields",
    "attrition": "workbench.reports",
    "Catalog": "workbench.catalog",
    "change_over_time": "workbench.psychometrics",
    "combine_table": "workbench.decoded",
    "Config": "workbench.config",
    "create_study": "workbench.studies",
    "definition_from_options": "workbench.studies",
    "ema_compliance": "workbench.reports",
    "enroll": "workbench.enrollment",
    "export_sources": "workbench.export",
    "export_tables": "workbench.sensors.sharing",
    "features": "workbench.features",  # the package itself, callable: features(config, study)
    "app_usage": "workbench.features.build",
    "write_features": "workbench.features.build",
    "read_features": "workbench.features.build",
    "get_job": "workbench.jobs",
    "get_study": "workbench.studies",
    "init_home": "workbench.config",
    "instrument": "workbench.instruments",
    "JobConfigManager": "workbench.jobs",
    "labelled_minutes": "workbench.features.build",
    "ledger_counts": "workbench.ledger",
    "list_alerts": "workbench.alerts",
    "list_instruments": "workbench.instruments",
    "list_runs": "workbench.pipelines",
    "list_studies": "workbench.studies",
    "load_config": "workbench.config",
    "open_catalog": "workbench.catalog",
    "participant_report": "workbench.reports",
    "questionnaire_dispositions": "workbench.reports",
    "questionnaire_report": "workbench.reports",
    "rebuild_decoded": "workbench.export",
    "recover_incoming": "workbench.ingest",
    "refresh_status": "workbench.refresh",
    "run_pipeline": "workbench.pipelines",
    "sanity_check": "workbench.sanity",
    "quarantine_table": "workbench.sensors.tables",
    "score": "workbench.instruments",
    "sensor_data": "workbench.sensors.loading",
    "sensor_schema": "workbench.sensors.schemas",
    "set_timezone": "workbench.subjects",
    "sensing_dispositions": "workbench.reports",
    "status_history_table": "workbench.status",
    "study_status": "workbench.status",
    "verify": "workbench.ledger",
    "write_attrition_report": "workbench.reports",
    "write_participant_report": "workbench.reports",
    "write_questionnaire_report": "workbench.reports",
}

if TYPE_CHECKING:  # for type checkers and the API reference
    from workbench.alerts import ack_alert, list_alerts
    from workbench.catalog import Catalog, open_catalog
    from workbench.config import Config, init_home, load_config
    from workbench.decoded import combine_table
    from workbench.enrollment import enroll
    from workbench.export import export_sources, rebuild_decoded
    from workbench.features.build import (
        app_usage,
        labelled_minutes,
        read_features,
        write_features,
    )
    from workbench.ingest import recover_incoming
    from workbench.instruments import instrument, list_instruments, score
    from workbench.jobs import JobConfigManager, get_job
    from workbench.ledger import ledger_counts, verify
    from workbench.pipelines import list_runs, run_pipeline
    from workbench.psychometrics import change_over_time
    from workbench.refresh import refresh_status
    from workbench.reports import (
        attrition,
        ema_compliance,
        participant_report,
        questionnaire_dispositions,
        questionnaire_report,
        sensing_dispositions,
        write_attrition_report,
        write_participant_report,
        write_questionnaire_report,
    )
    from workbench.sanity import sanity_check
    from workbench.sensors.loading import sensor_data
    from workbench.sensors.schemas import sensor_schema
    from workbench.sensors.sharing import export_tables
    from workbench.sensors.tables import build_tables, quarantine_table
    from workbench.sensors.yields import data_yield
    from workbench.status import status_history_table, study_status
    from workbench.studies import (
        archive_study,
        create_study,
        definition_from_options,
        get_study,
        list_studies,
    )
    from workbench.subjects import set_timezone

__all__ = sorted([*_LAZY, *_ERRORS])


def __getattr__(name: str):
    """Import a public name on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    imported = importlib.import_module(module)
    # a public name that is a module of its own (the callable ``workbench.features``)
    value = imported if module == f"{__name__}.{name}" else getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
