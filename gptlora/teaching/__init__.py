"""For notebooks and exercises: the parameter cell every notebook starts with (``notebook_params``) and
the checks of the exercise notebooks, whose failures name the expected value, the found one and the
likely mistake (``exercise_checks``).
"""
