{{/* Name of every object of this release (the RayCluster too). */}}
{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "splitserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Scrape annotations for Prometheus without the Operator. */}}
{{- define "splitserve.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.pool.router.http_port | default 8000 | quote }}
prometheus.io/path: /metrics
{{- end -}}

{{/*
A worker group of the RayCluster. Called with (dict "root" $ "role" "prefill"); GPUs and Ray
custom resources come from the pool config, so they always match what the actors ask for.
*/}}
{{- define "splitserve.workerGroup" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $group := index $root.Values.workerGroups $role -}}
{{- $pool := index $root.Values.pool $role -}}
{{- $perPod := int $group.workersPerPod -}}
{{- $gpus := mul $perPod ($pool.num_gpus | default 0) -}}
{{- $res := dict -}}
{{- range $name, $amount := ($pool.resources | default dict) -}}
{{- $_ := set $res $name (mul $perPod $amount) -}}
{{- end -}}
- groupName: {{ $role }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams:
    metrics-export-port: "8080"
    {{- if $res }}
    # Custom Ray resources the {{ $role }} actors ask for (escaped JSON in quotes: the form
    # KubeRay and the Ray autoscaler parse).
    resources: {{ printf "\"%s\"" (toJson $res | replace "\"" "\\\"") | squote }}
    {{- end }}
    {{- if not $gpus }}
    num-gpus: "0"
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "splitserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $role }}
    spec:
      terminationGracePeriodSeconds: 60
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "splitserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["/bin/bash", "-c", "--"]
          args: ['ulimit -n 65536; exec /bin/bash -c "$KUBERAY_GEN_RAY_START_CMD"']
          {{- with $root.Values.env }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - {name: metrics, containerPort: 8080}
          resources:
            requests:
              {{- with $group.resources.requests }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              {{- if $gpus }}
              nvidia.com/gpu: {{ $gpus | quote }}
              {{- end }}
            limits:
              {{- with $group.resources.limits }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              {{- if $gpus }}
              nvidia.com/gpu: {{ $gpus | quote }}
              {{- end }}
          volumeMounts:
            - {name: models, mountPath: {{ $root.Values.models.mountPath }}, readOnly: true}
            - {name: dshm, mountPath: /dev/shm}
      volumes:
        - name: models
          persistentVolumeClaim:
            claimName: {{ $root.Values.models.existingClaim }}
            readOnly: true
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $group.shmSize }}
{{- end -}}
