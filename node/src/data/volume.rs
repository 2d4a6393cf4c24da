//! Images and label images: 2D (`depth == 1`) or 3D stacks of planes.

/// A 2D or 3D image: `depth` planes of `height x width`, plane-major then row-major.
#[derive(Clone, PartialEq)]
pub struct Volume<T> {
    /// Planes (1 for a 2D image).
    pub depth: usize,
    /// Rows per plane.
    pub height: usize,
    /// Columns per row.
    pub width: usize,
    /// `depth * height * width` values.
    pub data: Vec<T>,
}

impl<T> std::fmt::Debug for Volume<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({}x{}x{})", self.depth, self.height, self.width)
    }
}

/// Intensities as f32.
pub type Image = Volume<f32>;
/// Instance labels: 0 is background, every other value one object.
pub type Labels = Volume<u32>;

impl<T: Copy + Default> Volume<T> {
    /// A volume filled with `T::default()`.
    #[must_use]
    pub fn new(depth: usize, height: usize, width: usize) -> Self {
        Self {
            depth,
            height,
            width,
            data: vec![T::default(); depth * height * width],
        }
    }

    /// A 2D volume from row-major data.
    ///
    /// # Panics
    /// If `data.len() != height * width` (a programming error).
    #[must_use]
    pub fn from_2d(height: usize, width: usize, data: Vec<T>) -> Self {
        assert_eq!(data.len(), height * width, "2D data of the wrong length");
        Self {
            depth: 1,
            height,
            width,
            data,
        }
    }

    /// Values per plane.
    #[must_use]
    pub fn plane_len(&self) -> usize {
        self.height * self.width
    }

    /// Plane `z`.
    #[must_use]
    pub fn plane(&self, z: usize) -> &[T] {
        let n = self.plane_len();
        &self.data[z * n..(z + 1) * n]
    }

    /// Plane `z`, mutably.
    pub fn plane_mut(&mut self, z: usize) -> &mut [T] {
        let n = self.plane_len();
        &mut self.data[z * n..(z + 1) * n]
    }

    /// Plane `z` as a 2D volume.
    #[must_use]
    pub fn plane_volume(&self, z: usize) -> Self {
        Self::from_2d(self.height, self.width, self.plane(z).to_vec())
    }

    /// Value at `(z, y, x)`.
    #[must_use]
    pub fn at(&self, z: usize, y: usize, x: usize) -> T {
        self.data[(z * self.height + y) * self.width + x]
    }

    /// Whether `other` has the same dimensions.
    #[must_use]
    pub fn same_shape<U>(&self, other: &Volume<U>) -> bool {
        (self.depth, self.height, self.width) == (other.depth, other.height, other.width)
    }

    /// `(depth, height, width)`.
    #[must_use]
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.depth, self.height, self.width)
    }
}

impl Labels {
    /// The distinct non-zero labels, ascending.
    #[must_use]
    pub fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.data.iter().copied().filter(|&l| l != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}
