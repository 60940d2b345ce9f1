"""Head scores: ``HeadScores`` (``head_scores``) and RAM & co. (``ram``)."""
