//! A fixed-capacity slab with generation counters, so a stale handle never reaches a new
//! occupant of a reused slot.

/// A slab of `T` addressed by `u32` indices, with a generation per slot.
#[derive(Debug)]
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
    cap: usize,
}

#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

impl<T> Slab<T> {
    /// A slab that never holds more than `cap` values; its memory is reserved up front so
    /// inserting never allocates.
    pub fn with_capacity(cap: usize) -> Slab<T> {
        Slab { slots: Vec::with_capacity(cap), free: Vec::with_capacity(cap), len: 0, cap }
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
            let slot = &mut self.slots[i as usize];
            slot.value = Some(value);
            return Ok((i, slot.generation));
        }
        let i = self.slots.len() as u32;
        self.slots.push(Slot { generation: 0, value: Some(value) });
        Ok((i, 0))
    }

    /// Removes the value at `i`, bumping the slot's generation.
    pub fn remove(&mut self, i: u32) -> Option<T> {
        let slot = self.slots.get_mut(i as usize)?;
        let v = slot.value.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(i);
        self.len -= 1;
        Some(v)
    }

    /// The value at `i`.
    #[inline]
    pub fn get(&self, i: u32) -> Option<&T> {
        self.slots.get(i as usize)?.value.as_ref()
    }

    /// The value at `i`, mutable.
    #[inline]
    pub fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.slots.get_mut(i as usize)?.value.as_mut()
    }

    /// The value at `i` if its generation is still `generation`.
    pub fn get_checked(&self, i: u32, generation: u32) -> Option<&T> {
        let slot = self.slots.get(i as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.as_ref()
    }

    /// The current generation of slot `i`.
    pub fn generation(&self, i: u32) -> u32 {
        self.slots.get(i as usize).map_or(0, |s| s.generation)
    }

    /// Iterates over occupied slots.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| s.value.as_ref().map(|v| (i as u32, v)))
    }

    /// Bytes reserved by the slab.
    pub fn allocation_size(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot<T>>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_reuse_bumps_generation() {
        let mut s = Slab::with_capacity(2);
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
