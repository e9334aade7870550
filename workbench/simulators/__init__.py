"""Local stand-ins for what lives elsewhere, and the demo that runs them together.

    phones        simulated participants' phones uploading JTrack batches (``make run``)
    days          realistic days in the app's shapes, with their truth (``workbench simulate``)
    study_server  a MindTrails-style study server with encrypted questionnaire tables
    providers     a provider API (Google Health, Open Humans, REST) with OAuth2 and rate limits
    demo          ``workbench demo`` (``make run``): a demo home, the server, phones, scheduler

The library never imports this package; the CLI, the tests and the benchmarks do.
"""
