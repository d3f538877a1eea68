"""Running a method over tasks: the run directory and its task records (`record`), the loop that
solves tasks and resumes (`runner`), and the Ray executor (`ray_executor`)."""
