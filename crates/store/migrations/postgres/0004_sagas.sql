-- Jobs with several named outputs run them as the steps of a saga: `outputs` holds what was
-- asked for (`[]` for one unnamed output), `steps` the outputs written so far by name (a JSON
-- object), and `compensate` the error the saga fails with once it has deleted what it wrote.
ALTER TABLE jobs ADD COLUMN outputs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN steps TEXT NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN compensate TEXT;
