"""The same run from Python: the model factory of examples/my_model.py on an image folder.

    python examples/make_image_folder.py digits
    python -m examples.train_from_python digits      (from the checkout's root)
"""

import sys

from easgd_local import TrainConfig, train

from examples.my_model import make_net

if __name__ == "__main__":  # the workers are spawned: they import this file, not run it
    config = TrainConfig(algo="eamsgd", workers=2, epochs=2, dataset="imagefolder",
                         data_dir=sys.argv[1] if len(sys.argv) > 1 else "digits",
                         out=sys.argv[2] if len(sys.argv) > 2 else None)
    summary = train(config, model=make_net)
    print(f"center test accuracy {summary['final_test_accuracy']:.4f} after "
          f"{summary['train_seconds']:.1f} s ({summary['samples_per_second']:,.0f} samples/s)")
