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
    scored = workbench.score(phq9, "phq9", config=config)  # phq9_total, phq9_band, ...
    change = workbench.change_over_time(scored, "phq9")  # response, remission, RCI
    retention = workbench.attrition(config, "sleep").retention
    record = workbench.run_pipeline(config, "status")   # a notebook run, tracked as a job
"""

from workbench.alerts import ack_alert, list_alerts
from workbench.catalog import Catalog, open_catalog
from workbench.config import Config, init_home, load_config
from workbench.enrollment import enroll
from workbench.errors import WorkbenchError
from workbench.export import combine_table, export_sources, rebuild_decoded
from workbench.ingest import recover_incoming
from workbench.instruments import instrument, list_instruments, score
from workbench.jobs import JobConfigManager, get_job
from workbench.ledger import ledger_counts, verify
from workbench.pipelines import list_runs, run_pipeline
from workbench.psychometrics import change_over_time
from workbench.reports import attrition, participant_report, questionnaire_report
from workbench.sanity import sanity_check
from workbench.simulator import simulate
from workbench.status import refresh_status, status_history_table, study_status
from workbench.studies import (
    archive_study,
    create_study,
    definition_from_options,
    get_study,
    list_studies,
)

__all__ = [
    "Catalog",
    "Config",
    "JobConfigManager",
    "WorkbenchError",
    "ack_alert",
    "attrition",
    "change_over_time",
    "combine_table",
    "archive_study",
    "create_study",
    "definition_from_options",
    "enroll",
    "export_sources",
    "get_job",
    "get_study",
    "init_home",
    "instrument",
    "ledger_counts",
    "list_alerts",
    "list_instruments",
    "list_runs",
    "list_studies",
    "load_config",
    "open_catalog",
    "participant_report",
    "questionnaire_report",
    "rebuild_decoded",
    "recover_incoming",
    "run_pipeline",
    "refresh_status",
    "sanity_check",
    "score",
    "simulate",
    "status_history_table",
    "study_status",
    "verify",
]
