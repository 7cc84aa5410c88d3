//! A fixed-capacity slab with generation counters, so a stale handle never reaches a new
//! occupant of a reused slot.
//!
//! Values sit in one dense array with no per-slot header (a 96-byte flow stays 96 bytes); a
//! separate array of generations says which slots are occupied (odd generation) and bumps on
//! every insert and removal. A freed slot keeps a default value until it is reused.

/// A slab of `T` addressed by `u32` indices, with a generation per slot.
#[derive(Debug)]
pub struct Slab<T> {
    values: Vec<T>,
    generations: Vec<u32>,
    free: Vec<u32>,
    len: usize,
    cap: usize,
}

impl<T> Slab<T> {
    /// A slab that never holds more than `cap` values; its memory is reserved up front so
    /// inserting never allocates.
    pub fn with_capacity(cap: usize) -> Slab<T> {
        Slab {
            values: Vec::with_capacity(cap),
            generations: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            len: 0,
            cap,
        }
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when an insert would be refused.
    pub fn is_full(&self) -> bool {
        self.len >= self.cap
    }

    /// Inserts a value, returning its index and generation, or gives it back when full.
    pub fn insert(&mut self, value: T) -> Result<(u32, u32), T> {
        if self.is_full() {
            return Err(value);
        }
        self.len += 1;
        if let Some(i) = self.free.pop() {
            self.values[i as usize] = value;
            let g = &mut self.generations[i as usize];
            *g = g.wrapping_add(1);
            return Ok((i, *g));
        }
        let i = self.values.len() as u32;
        self.values.push(value);
        self.generations.push(1);
        Ok((i, 1))
    }

    fn occupied(&self, i: u32) -> bool {
        self.generations.get(i as usize).is_some_and(|g| g & 1 == 1)
    }

    /// The value at `i`.
    #[inline]
    pub fn get(&self, i: u32) -> Option<&T> {
        if self.occupied(i) {
            self.values.get(i as usize)
        } else {
            None
        }
    }

    /// The value at `i`, mutable.
    #[inline]
    pub fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        if self.occupied(i) {
            self.values.get_mut(i as usize)
        } else {
            None
        }
    }

    /// The value at `i` without the occupancy check: for indexes, which only ever hold
    /// occupied slots. A freed slot reads as `T::default()` (or a stale value until reused).
    #[inline]
    pub fn peek(&self, i: u32) -> Option<&T> {
        self.values.get(i as usize)
    }

    /// [`Slab::peek`], mutable: for indexes, which only ever hold occupied slots.
    #[inline]
    pub fn peek_mut(&mut self, i: u32) -> Option<&mut T> {
        self.values.get_mut(i as usize)
    }

    /// The value at `i` if its generation is still `generation`.
    pub fn get_checked(&self, i: u32, generation: u32) -> Option<&T> {
        if self.generations.get(i as usize) != Some(&generation) {
            return None;
        }
        self.get(i)
    }

    /// The current generation of slot `i`.
    pub fn generation(&self, i: u32) -> u32 {
        self.generations.get(i as usize).copied().unwrap_or(0)
    }

    /// Iterates over occupied slots.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.values
            .iter()
            .zip(&self.generations)
            .enumerate()
            .filter(|(_, (_, g))| *g & 1 == 1)
            .map(|(i, (v, _))| (i as u32, v))
    }

    /// Bytes reserved by the slab.
    pub fn allocation_size(&self) -> usize {
        self.values.capacity() * std::mem::size_of::<T>()
            + (self.generations.capacity() + self.free.capacity()) * std::mem::size_of::<u32>()
    }
}

impl<T: Default> Slab<T> {
    /// Removes the value at `i`, bumping the slot's generation.
    pub fn remove(&mut self, i: u32) -> Option<T> {
        let g = self.generations.get_mut(i as usize)?;
        if *g & 1 == 0 {
            return None;
        }
        *g = g.wrapping_add(1);
        self.free.push(i);
        self.len -= 1;
        Some(std::mem::take(&mut self.values[i as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_reuse_bumps_generation() {
        let mut s: Slab<&str> = Slab::with_capacity(2);
        let (a, ga) = s.insert("a").unwrap();
        let (b, _) = s.insert("b").unwrap();
        assert_eq!(s.insert("c"), Err("c"));
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.remove(a), None);
        let (c, gc) = s.insert("c").unwrap();
        assert_eq!(c, a);
        assert_ne!(gc, ga);
        assert_eq!(s.get_checked(c, ga), None);
        assert_eq!(s.get_checked(c, gc), Some(&"c"));
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 2);
        assert_eq!(s.iter().count(), 2);
    }
}
