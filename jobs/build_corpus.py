"""Ray job: a corpus YAML's sources, from their recordings -> windows. Same flags as `biofm build-corpus`.

    python jobs/build_corpus.py --raw-root ../shared/realdata --outdir data/corpus
"""

from biofm.cli import run_job

if __name__ == "__main__":
    run_job("build-corpus")
