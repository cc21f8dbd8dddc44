"""Data: 2-D toy densities, the Gaussian-mixture oracle, in-memory datasets and local loaders (no downloads)."""
from .earth import EARTH_DATASETS, latlon_to_xyz, load_earth, load_latlon_csv, xyz_to_latlon
from .datasets import AbstractDataset, ArrayDataset, ToyDataset
from .loaders import available_datasets, load_array, load_dataset, load_digits, load_image_folder
from .images import load_image, load_mask, save_image
from .mixture import GaussianMixture
from .photos import CROP_SPLITS, PHOTOS, TEST_IMAGES, TRAIN_IMAGES, load_photo, photo_crops, photo_patches
from .toys import TOYS, sample_toy

__all__ = ["GaussianMixture", "TOYS", "sample_toy", "AbstractDataset", "ArrayDataset", "ToyDataset",
           "available_datasets", "load_array", "load_dataset", "load_digits", "load_image_folder", "EARTH_DATASETS", "latlon_to_xyz", "load_earth", "load_latlon_csv",
           "xyz_to_latlon", "load_image", "load_mask", "save_image", "PHOTOS", "TEST_IMAGES", "TRAIN_IMAGES", "load_photo", "photo_patches",
           "photo_crops", "CROP_SPLITS"]
