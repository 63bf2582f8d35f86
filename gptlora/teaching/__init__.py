"""For notebooks and exercises: the parameter cell every notebook starts with (``notebook_params``), the
checks of the exercise notebooks, whose failures name the expected value, the found one and the likely
mistake (``exercise_checks``), and the two halves of the sandboxed grader that both sides share: what runs
a submission and reports its answers as JSON (``run_submission``) and how the grader's inputs are built and
its observations compared (``grading_probes``).
"""
